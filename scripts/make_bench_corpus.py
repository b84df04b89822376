"""Make a JSONL text corpus of a given size from freely licensed text installed on a Debian box,
for measuring `megatron-lowp prepare` throughput (docs/LOG.md). Not training data.

Paragraphs come from the embedded corpus (Jargon File, Devil's Dictionary, BSD fortunes),
the Vim help files (/usr/share/vim/vim*/doc/*.txt, Vim license), the license texts in
/usr/share/common-licenses and the Debian package changelogs (/usr/share/doc/*/changelog*.gz).
They are deduplicated, then documents of 1-24 randomly drawn paragraphs are written until the
target size is reached, so documents are distinct even where paragraphs recur. Deterministic
for a given --seed and set of installed packages.

Usage: python scripts/make_bench_corpus.py --out /tmp/bench --megabytes 110 [--shards 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lowp.data import read_corpus  # noqa: E402


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def collect() -> list[str]:
    paras: list[str] = []
    for doc in read_corpus():
        paras += paragraphs(doc["text"])
    for path in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")) + sorted(glob.glob("/usr/share/common-licenses/*")):
        paras += paragraphs(Path(path).read_text(encoding="utf-8", errors="replace"))
    for path in sorted(glob.glob("/usr/share/doc/*/changelog*.gz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            paras += paragraphs(f.read())
    return list(dict.fromkeys(paras))  # dedupe, keep order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--megabytes", type=float, default=110.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paras = collect()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    target = int(args.megabytes * 1e6)
    files = [open(args.out / f"corpus_{i:02d}.jsonl", "w", encoding="utf-8") for i in range(args.shards)]  # noqa: SIM115
    written = docs = 0
    while written < target:
        text = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 24)))
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        files[docs % args.shards].write(line)
        written += len(line.encode("utf-8"))
        docs += 1
    for f in files:
        f.close()
    print(f"{len(paras):,} distinct paragraphs -> {docs:,} documents, {written / 1e6:.1f} MB in {args.shards} "
          f"shards under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
