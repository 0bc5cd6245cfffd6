"""
Reading the JSON files of train.py's run folders (metrics.jsonl, args.json, bench.json) for the summary
scripts, checked: a bad file ends in one line naming it (and the line), never a traceback. No torch import.
"""
import json
import sys


def read_jsonl(path):
    """
    The rows of a JSON lines file, each a JSON object; a bad line ends the script in one line naming path:line,
    except a last line cut short without its newline (a run killed while appending), which is skipped with a
    note. Example: '{"a": 1}\\n{"a": 2' -> [{"a": 1}], and "...: line 2 cut short (an interrupted write), skipped".
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        sys.exit(f"{path}: not UTF-8 text (byte {e.start})")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the write was interrupted
                print(f"{path}: line {i} cut short (an interrupted write), skipped", file=sys.stderr)
                break
            sys.exit(f"{path}:{i}: not valid JSON ({e})")
        if not isinstance(row, dict):
            sys.exit(f"{path}:{i}: must be a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


def read_object(path):
    """A JSON file that holds one object (args.json, bench.json), or one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: not valid JSON ({e})")
    if not isinstance(d, dict):
        sys.exit(f"{path}: must be a JSON object, not {type(d).__name__}")
    return d
