"""`make gpu-check`: one script that checks a GPU machine end to end in under 8 minutes.

    python -m bench.gpu_check [--sections attention,tiled] [--budget-s 450] [--out DIR]
    python -m bench.gpu_check --smoke      # the same code paths on CPU at tiny sizes

Legend (kernels/__init__.py): T tokens, N documents, L one document's length, Hq query heads,
K key/value heads, G = Hq / K, D head dim, E model width, F MLP width, V vocabulary.

Sections, in this order, each in its own try/except (its error text lands in the results and
the next one runs), each under a wall-clock budget cut to what the overall `--budget-s` has
left (remaining sizes or runs are skipped with the reason), the JSON and markdown rewritten
after every section so a killed run still leaves what it measured; a section still running
`--grace-s` (90) past the overall budget, or a SIGTERM, ends the run the same way (the
running section marked, its subprocesses killed), inside a 10-minute limit by default:
- pytest: every `gpu`-marked test (`pytest -m gpu`, a subprocess, counts from its junit XML);
- attention: fwd and fwd+bwd TFLOP/s of each backend on packed bf16 batches (llama3_8b's
  Hq=32, K=8, D=128), and the max abs error of out, lse, dq, dk, dv against a float64
  reference computed on the same device in row chunks; the issue's goal row (Triton fwd+bwd
  >= 0.8x torch_varlen at 32K);
- tiled: the tiled loss and the tiled MLP against their materialised forms (peak memory,
  time, max difference);
- memory: the planner's `peak_bytes_per_gpu` against the measured `mem_peak_bytes` of a
  short training run (llama3_1b, one GPU, bf16, the full memory stack) at 32K and 128K;
- train: 20 steps of llama3_1b at 32K, median tokens/s and MFU after the first steps;
- sp (2+ GPUs): NCCL Ulysses 2 and ring 2 losses against one process, `bench.sp_attention`.
Writes <out>/gpu_check.json and <out>/gpu_check.md and prints the tables. Without a GPU (and
without --smoke) it prints one line and exits 0.
"""
