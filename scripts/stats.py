"""
The statistics of the seed studies (scripts/seeds_summary.py, scripts/fig7.py): mean and standard deviation over
seeds, their 'm ± sd' text, Student's t p-value, the paired t-test and its verdict. No torch import.

  from stats import mean_sd, paired_test, verdict
  verdict([0.5, 0.6, 0.4], "QAT+KD", "QAT")  # -> "QAT+KD better" (t 8.7 on 2 df, p 0.013)
"""
import math
import statistics


def mean_sd(xs):
    """(mean, sample standard deviation); the sd is nan for one value."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def pm(m, sd, digits=2, sign=""):
    """'m ± sd', or 'm' alone when one seed leaves no sd."""
    return f"{m:{sign}.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def t_pvalue(t, df):
    """
    Two-sided p-value of Student's t with df degrees of freedom: 2 P(T > |t|), Simpson's rule on the density.
    Examples: t_pvalue(12.706, 1) ~ 0.05, t_pvalue(4.303, 2) ~ 0.05, t_pvalue(0, 3) = 1.
    """
    t = abs(t)
    if t == 0:
        return 1.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    n = 2000  # even; P(0 < T < t) by Simpson's rule, exact to ~1e-9 here
    h = t / n
    area = h / 3 * (f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n)))
    return max(0.0, 1 - 2 * area)


def paired_test(diffs):
    """a - b, paired by seed: (p-value of the paired t-test, two-sided; None below 2 seeds or when all equal)."""
    if len(diffs) < 2:
        return None
    m, sd = mean_sd(diffs)
    if sd == 0:
        return 0.0 if m else 1.0
    return t_pvalue(m / (sd / math.sqrt(len(diffs))), len(diffs) - 1)


def verdict(diffs, a, b):
    """
    diffs = a - b, paired by seed: 'A better' / 'A worse' when the paired t-test gives p < 0.05 (two-sided), else
    'not distinguishable'; 'too few seeds' below two. b names the other side (the verdict is worded from a's).
    Example: verdict([1, 1, 1], "QAT+KD", "QAT") -> "QAT+KD better".
    """
    p = paired_test(diffs)
    if p is None:
        return "too few seeds"
    m = statistics.fmean(diffs)
    return (f"{a} better" if m > 0 else f"{a} worse") if p < 0.05 else "not distinguishable"
