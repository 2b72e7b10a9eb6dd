"""`coral-fast` command line: each subcommand lives in its own module and owns its flags.

    coral-fast bench head|attention|e2e [...]
    coral-fast generate --model smollm2 --prompt TEXT [...]
    coral-fast train --model smollm2 --data DIR --out DIR [...]
    coral-fast export --format eagle DRAFT_DIR OUT_DIR [...]
"""
import sys
from importlib import import_module

# subcommand -> module with `main(argv) -> int`
COMMANDS = {
    ("bench", "head"): "coral_fast.benchmarks.head",
    ("bench", "attention"): "coral_fast.benchmarks.attention",
    ("bench", "e2e"): "coral_fast.benchmarks.e2e",
    ("generate",): "coral_fast.generate_cli",
    ("train",): "coral_fast.training.cli",
    ("data",): "coral_fast.training.data",
    ("export",): "coral_fast.export_cli",
}

USAGE = """usage: coral-fast <command> [options]

commands:
  bench head        grouped LM head + fused top-k vs dense cuBLAS + torch.topk
  bench attention   tree attention vs SDPA with a tree mask and FlexAttention
  bench e2e         the loop vs the engine's plain mode vs HF generate: task suite, --scale configs
  generate          speculative generation on a target model
  train             CORAL draft training (multi-step, CSRA, router)
  data              self-distillation data from a target model
  export            a draft in EAGLE's checkpoint format (SGLang, vLLM, EAGLE)

`coral-fast <command> --help` shows the options of each."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    for key in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(key)]) == key:
            module = import_module(COMMANDS[key])
            return int(module.main(argv[len(key):]) or 0)
    print(f"coral-fast: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2
