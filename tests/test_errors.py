"""
Bad input ends in one clear line: every class of mistake a user can make with train.py, infer.py and bench.py,
run as a user would (a subprocess), asserting the exit status (2 bad usage, 1 bad file), no traceback, and that
the last stderr line names the file (with line), key or flag.
"""
import os
import subprocess
import sys

import pytest

from test_train import make_glue, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script, *args, code):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, input="good film\n")
    assert r.returncode == code, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: "), last
    return last


@pytest.fixture
def setup(tmp_path):
    make_glue(tmp_path / "glue")
    make_model(tmp_path / "m")
    return tmp_path


def train_args(t, *extra):
    return ["--task", "sst2", "--model", t / "m", "--data-dir", t / "glue", "--output-dir", t / "out",
            "--epochs", "1", "--threads", "1", *extra]


@pytest.mark.parametrize("script, args, flag", [
    ("train.py", ["--batch-size", "0"], "--batch-size"),
    ("train.py", ["--lam", "-0.1"], "--lam"),
    ("train.py", ["--temperature", "0"], "--temperature"),
    ("train.py", ["--target-flops", "1.5"], "--target-flops"),
    ("train.py", ["--lr", "nan"], "--lr"),
    ("train.py", ["--epochs", "-1"], "--epochs"),
    ("train.py", ["--final-threshold", "-1"], "--final-threshold"),
    ("train.py", ["--task", "sst3"], "--task"),
    ("infer.py", ["--model", "m", "--batch-size", "0"], "--batch-size"),
    ("infer.py", ["--model", "m", "--threads", "-2"], "--threads"),
    ("bench.py", ["--model", "m", "--batch-sizes", "1,0"], "--batch-sizes"),
    ("bench.py", ["--model", "m", "--repeats", "0"], "--repeats"),
    ("bench.py", ["--model", "m", "--precision", "fp32,fp16"], "--precision"),
    ("infer.py", ["--model", "m", "--precision", "fp16"], "--precision"),
    ("train.py", ["--flops-warmup", "1.5"], "--flops-warmup"),
    ("train.py", ["--seed", "-1"], "--seed"),
    ("train.py", ["--lengths", "20,16,x"], "--lengths"),
    ("train.py", ["--lengths", "20,0"], "--lengths"),
    ("train.py", ["--stages", "hard,soft"], "--stages"),
    ("train.py", ["--stages", "finetune,finetune"], "--stages"),
    ("train.py", ["--device", "gpu"], "--device"),
    ("infer.py", ["--model", "m", "--task", "sst3"], "--task"),
    ("bench.py", ["--model", "m", "--task", "sst3"], "--task"),
])
def test_out_of_range_flags_are_usage_errors(script, args, flag):
    last = cli(script, *args, code=2)
    assert flag in last


def test_corrupt_and_truncated_safetensors(setup):
    t = setup
    st = t / "m" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(b"\xff" * 8 + data[8:])  # a header length no file can hold
    assert "model.safetensors: not a valid safetensors file" in cli("infer.py", "--model", t / "m", "--input", "-", code=1)
    st.write_bytes(data[:len(data) // 2])   # the data cut short
    assert "model.safetensors: not a valid safetensors file" in cli("train.py", *train_args(t), code=1)


def test_config_json_that_is_not_json(setup):
    (setup / "m" / "config.json").write_text("{\"hidden_size\": 16,")
    assert "config.json: not valid JSON" in cli("infer.py", "--model", setup / "m", "--input", "-", code=1)


def test_misspelt_tensor_names_both_keys(setup):
    from safetensors.torch import load_file, save_file
    st = setup / "m" / "model.safetensors"
    sd = load_file(st)
    sd["encoder.layer.0.attention.self.qery.weight"] = sd.pop("encoder.layer.0.attention.self.query.weight")
    save_file(sd, st)
    last = cli("infer.py", "--model", setup / "m", "--input", "-", code=1)
    assert "missing tensor(s) 'encoder.layer.0.attention.self.query.weight'" in last
    assert "unexpected tensor(s) 'encoder.layer.0.attention.self.qery.weight'" in last


@pytest.mark.parametrize("content, needle", [
    ("sentence\tlabel\ngood film\t1\nbad\t1\tx\n", "train.tsv:3: malformed row: expected 2 columns, found 3"),
    ("sentence\tlabel\ngood film\t1\nbad film\t2\n", "train.tsv:3: malformed row: label '2'"),
    ("sentence\tlabel\n", "train.tsv: no data rows"),
    (b"sentence\tlabel\ngood \xff film\t1\n", "train.tsv: not UTF-8 text"),
])
def test_glue_reader_errors_through_train_py(setup, content, needle):
    path = setup / "glue" / "SST-2" / "train.tsv"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    assert needle in cli("train.py", *train_args(setup), code=1)


def test_outputs_that_cannot_be_created(setup):
    import ltp
    ltp.save(ltp.Model(ltp.load(str(setup / "m")).cfg, num_labels=2), str(setup / "m"))  # a classifier for infer.py
    (setup / "blocker").write_text("a file, not a folder")
    last = cli("train.py", *train_args(setup)[:-2], "--output-dir", setup / "blocker" / "run", code=1)
    assert "--output-dir" in last and "blocker" in last
    (setup / "in.txt").write_text("good film\n")
    last = cli("infer.py", "--model", setup / "m", "--input", setup / "in.txt", "--output",
               setup / "blocker" / "preds.jsonl", code=1)
    assert last.startswith("infer.py: error: --output") and "blocker" in last
    last = cli("bench.py", "--model", setup / "m", "--input", setup / "in.txt", "--json", setup / "blocker" / "b.json",
               code=1)
    assert last.startswith("bench.py: error: --json") and "blocker" in last


def test_lam_with_target_flops_and_a_missing_model(setup):
    assert "--lam" in cli("train.py", *train_args(setup), "--lam", "0.5", "--target-flops", "0.6", code=2)
    assert "no-such-dir" in cli("infer.py", "--model", setup / "no-such-dir", "--input", "-", code=1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is there")
def test_train_on_cuda_without_one_is_a_usage_error():
    assert "--device cuda: no CUDA device available" in cli("train.py", "--device", "cuda", code=2)


def test_non_finite_weights_are_refused(setup):
    from safetensors.torch import load_file, save_file
    st = setup / "m" / "model.safetensors"
    sd = load_file(st)
    sd["embeddings.LayerNorm.weight"][3] = float("nan")
    save_file(sd, st)
    last = cli("infer.py", "--model", setup / "m", "--input", "-", code=1)
    assert "model.safetensors: tensor 'embeddings.LayerNorm.weight' has non-finite values" in last


def test_an_empty_input_file_holds_no_example(setup):
    import ltp
    ltp.save(ltp.Model(ltp.load(str(setup / "m")).cfg, num_labels=2), str(setup / "m"))
    (setup / "empty.txt").write_text("")
    assert "empty.txt: no input lines" in cli("infer.py", "--model", setup / "m", "--input", setup / "empty.txt", code=1)
    assert "empty.txt: no input lines" in cli("bench.py", "--model", setup / "m", "--input", setup / "empty.txt", code=1)


def test_infer_refuses_a_head_of_another_task(setup):
    import ltp
    m = ltp.Model(ltp.load(str(setup / "m")).cfg, num_labels=2)
    m.cfg.id2label = {"0": "entailment", "1": "not_entailment"}  # a QNLI model, scored on SST-2
    ltp.save(m, str(setup / "m"))
    last = cli("infer.py", "--model", setup / "m", "--task", "sst2", "--data-dir", setup / "glue", code=1)
    assert "the model's labels ['entailment', 'not_entailment'] (config.json id2label) are not sst2's ['0', '1']" in last


def test_check_task_head():
    import ltp
    from ltp.cli import check_task_head
    cfg = ltp.Config(model_type="bert", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=8)
    m = ltp.Model(cfg, num_labels=2)
    m.cfg.id2label = {"0": "0", "1": "1"}
    check_task_head(m, "sst2", "m")
    with pytest.raises(ValueError, match="head has 2 labels, stsb has 1"):
        check_task_head(m, "stsb", "m")
    with pytest.raises(ValueError, match="are not qnli's"):
        check_task_head(m, "qnli", "m")
    m.cfg.id2label = None  # a head of unnamed labels (LABEL_0, LABEL_1): any two-label task
    check_task_head(m, "qnli", "m")


def test_refuse_overwrite_compares_files_not_names(tmp_path):
    """ltp.cli.refuse_overwrite: the same inode is the same file (a symlink, a hard link, another spelling); a folder
    input stands for every file under it; an output not there yet, '-' and None pass."""
    from ltp.cli import refuse_overwrite
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "vocab.txt").write_text("x")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "other.txt").write_text("a")  # the same bytes, another file
    os.link(tmp_path / "a.txt", tmp_path / "b.txt")
    os.symlink(tmp_path / "m" / "sub" / "vocab.txt", tmp_path / "v.txt")
    inputs = {"--input": str(tmp_path / "a.txt"), "--model": str(tmp_path / "m")}
    refuse_overwrite({"--output": tmp_path / "other.txt", "--json": tmp_path / "new.json", "--plot": None}, inputs)
    refuse_overwrite([("--output", "-")], [("--input", "-")])
    for out, says in ((tmp_path / "b.txt", f"is --input {tmp_path / 'a.txt'} (the same file)"),
                      (f"{tmp_path}/./a.txt", f"is --input {tmp_path / 'a.txt'} (the same file)"),
                      (tmp_path / "v.txt", f"is {tmp_path / 'm' / 'sub' / 'vocab.txt'}, a file of --model {tmp_path / 'm'}")):
        with pytest.raises(ValueError) as e:
            refuse_overwrite([("--output", out)], inputs)
        assert str(e.value) == (f"--output {out} {says}" + ("" if "(the same file)" in says else " (the same file)")
                                + ": writing it would destroy the input; choose another --output")
