"""Benchmark kullm's training path against a faithful reimplementation of the seed recipe and TRL's SFTTrainer.

    python scripts/download_data.py --only eval          # once: the 252-row evaluation set, into data/eval/
    python -m benchmarks --data data/eval/user_oriented_instructions_eval.jsonl data/sample   # the tables' workload
    python -m benchmarks --data data/sample --shape body # the body-heavy CPU shape (hidden 1024, 8 layers)
    python -m benchmarks --data data/sample --repeats 5 --steps 12 --variants seed,kullm_packed_head
    python -m benchmarks --data data/sample --device cuda --model polyglot-ko-1.3b --shape-only --steps 30   # a GPU

``--data`` names the rows to train on (JSONL/JSON/CSV/Parquet files or folders, any layout kullm reads); the
bundled ``data/sample`` alone is a small workload that needs no download.

Every variant runs in its own subprocess (a fresh interpreter, so peak RSS is its own), in one process tree,
alternating variants inside each repeat, with the same model shape, data, seed and number of optimizer steps:

- ``seed`` / ``seed_grouped``: HF ``Trainer`` + PEFT LoRA (r=8, alpha=16, dropout 0.05, ``query_key_value``),
  per-example ``Dataset.map(generate_and_tokenize_prompt)`` exactly as the seed's ``finetune.py`` (tokenize
  prompt+response, append EOS if room, mask by tokenizing the prompt alone), ``DataCollatorForSeq2Seq(
  pad_to_multiple_of=8)``, ``group_by_length`` off / on. The seed's forced 8-bit base is left out (fp32 on CPU,
  bf16 on GPU, for both paths): it would only make the seed slower; ``seed_as_ran`` (a GPU) keeps it, with fp16 AMP.
- ``trl_grouped`` / ``trl_packed``: TRL's ``SFTTrainer`` on the same rows as prompt/completion pairs (the KULLM
  prompt rendered, the output as completion), completion-only loss, the same LoRA, no gradient checkpointing,
  fp32 on CPU; padded batches with ``group_by_length``, or ``packing=True`` (best-fit decreasing, padding-free).
- ``kullm_*``: ``kullm.train.train(cfg)`` with overrides switching one optimisation at a time; on a GPU only
  (``scripts/gpu_check.py`` runs them) also FlexAttention, the blocks under ``torch.compile``, and NF4 / LLM.int8
  bases loaded from a random-weight checkpoint in the shape (``--checkpoint``).

Throughput is measured from the end of the first optimizer step to the end of the last (the first step carries
one-off start-up costs), over the micro-batches of those steps, identically in every path: trained tokens (shifted
labels != -100), non-pad tokens (attention mask) and padded slots (tensor size).

Modules: :mod:`benchmarks.seed_recipe` (the seed recipe), :mod:`benchmarks.runners` (workload, TRL and kullm
variants, the preprocessing bench), :mod:`benchmarks.measure` (meter, memory, FLOP model, one subprocess per run),
:mod:`benchmarks.report` (the BENCHMARKS.md sections) and ``__main__`` (the command line); DPO against TRL's
``DPOTrainer`` is its own command, ``python -m benchmarks.dpo`` (:mod:`benchmarks.dpo`).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
