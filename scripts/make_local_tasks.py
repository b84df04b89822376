"""Write two lm-eval-harness tasks over held-out text, for `megatron-lowp eval --tasks` with no network.

- corpus_cloze (multiple_choice): the first --context-words words of a held-out document, and four
  candidate continuations of --choice-words words. One is the document's own; the other three come
  from other held-out documents, at the same position. Chance is 25%.
- corpus_ppl (loglikelihood_rolling): the held-out documents whole. The harness reports word and byte
  perplexity and bits per byte.

By default the held-out documents are the valid split of the embedded corpus, which the tiny recipes
never train on. `--jsonl FILE` takes the text field of any JSONL file instead.

    python scripts/make_local_tasks.py --out tasks/
    megatron-lowp eval runs/tiny-fp4 --tasks corpus_cloze,corpus_ppl --include-path tasks/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from megatron_lowp.data.embedded import document_split, read_corpus

HEAD = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"


def held_out_texts(jsonl: Path | None, text_key: str) -> list[str]:
    if jsonl is None:
        return [d["text"] for d in read_corpus() if document_split(d["text"]) == "valid"]
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)[text_key] for line in f if line.strip()]


def cloze_docs(texts: list[str], context_words: int, choice_words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    long = [t.split() for t in texts if len(t.split()) >= context_words + choice_words]
    endings = [" ".join(w[context_words:context_words + choice_words]) for w in long]
    docs = []
    for i, words in enumerate(long):
        others = rng.sample([j for j in range(len(long)) if endings[j] != endings[i]], 3)
        choices = [endings[j] for j in others]
        label = rng.randrange(4)
        choices.insert(label, endings[i])
        docs.append({"context": " ".join(words[:context_words]), "choices": choices, "label": label})
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the task YAMLs and their JSONL data")
    p.add_argument("--jsonl", type=Path, default=None, help="held-out documents (default: the embedded valid split)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--context-words", type=int, default=12)
    p.add_argument("--choice-words", type=int, default=6)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()

    texts = held_out_texts(args.jsonl, args.text_key)
    cloze = cloze_docs(texts, args.context_words, args.choice_words, args.seed)
    if len(cloze) < 4:
        raise SystemExit(f"only {len(cloze)} documents have {args.context_words + args.choice_words} words; "
                         "lower --context-words/--choice-words or give more text")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus_cloze", cloze), ("corpus_ppl", [{"text": t} for t in texts])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "corpus_cloze.yaml").write_text(
        "task: corpus_cloze\n" + HEAD.format(data=json.dumps(str(out / "corpus_cloze.jsonl"))) +
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    (out / "corpus_ppl.yaml").write_text(
        "task: corpus_ppl\n" + HEAD.format(data=json.dumps(str(out / "corpus_ppl.jsonl"))) +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        encoding="utf-8")
    print(f"wrote corpus_cloze ({len(cloze)} questions) and corpus_ppl ({len(texts)} documents) to {out}")


if __name__ == "__main__":
    main()
