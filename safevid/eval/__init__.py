"""SafeVidBench-style evaluation: a model answers risky video queries, a judge scores them.

    bench.py      benchmark files -> items (bad rows rejected with file:line and reason)
    generate.py   answers from a local transformers model, prompted exactly as in training
    judge.py      an OpenAI-compatible LLM judge with the versioned rubric (rubric_v1.md)
    heuristic.py  the offline keyword judge used when no judge endpoint is given
    report.py     per-category metrics -> report.json, report.md, report.png
    compare.py    before/after tables of two evaluations
    records.py    append-only JSONL logs that make every stage resumable
    cli.py        `safevid eval`
"""
