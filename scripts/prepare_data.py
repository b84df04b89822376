"""Tokenize raw text into Megatron-LM indexed datasets: the same as `megatron-lowp prepare`.

    python scripts/prepare_data.py --input data/*.jsonl --tokenizer tok.model --output-prefix out/corpus \
        [--valid-fraction 0.01] [--workers N] [--text-key text] [--append-eos/--no-eos] [--bos]

See `megatron-lowp prepare --help` and docs/data.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lowp.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
