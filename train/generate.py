"""Text generation with KV caches: ``python -m train.generate --config CFG [--checkpoint PATH]
--prompt TEXT --max-new-tokens N [--temperature T] [--top-p P] [--greedy] [--batch B] [--seed S]
[--capacity C] [--offload [--offload-copy kernel|xla]] [section.key=value ...]``.

Builds the model of the config (random init, or the parameters of a checkpoint written by
``python -m train``), prefills the byte-level prompt (UTF-8) in ``--batch`` rows and decodes
``--max-new-tokens`` bytes per row with the cached decode step
(:class:`sparse_attention_jax.generation.generator.Generator`); prints each row's text and the prefill and
decode throughput (tokens/s, compilation excluded and reported apart). Every decodable kind works,
NOSA included (``configs/nosa_*.yaml``); ``--offload`` keeps the K/V/c of every NOSA layer in
pinned host memory (:mod:`sparse_attention_jax.offload`) and also prints the blocks
transferred, hit rate and bytes moved host -> device.

Every failure (a bad flag or override, an unreadable config or checkpoint, a request the model
cannot serve) is one line on stderr starting with ``error:`` and exit status 2, never a traceback.

Example::

  python -m train.generate --config configs/tiny.yaml \\
      --checkpoint runs/tiny/checkpoints/300 --prompt "def " --max-new-tokens 200 --top-p 0.9
"""

from __future__ import annotations

import argparse
import sys


class _UsageError(Exception):
  """A command-line error argparse found (printed as one ``error:`` line)."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise _UsageError(message)


def _fail(message) -> int:
  """Prints ``error: <message>`` as one line on stderr; returns the exit status 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  return 2


def _parse_args(argv):
  p = _Parser(
    prog="python -m train.generate", description="Prefill + cached decoding of a byte-level model."
  )
  p.add_argument("--config", required=True, help="YAML file with a model: section")
  p.add_argument(
    "--checkpoint",
    default=None,
    help="checkpoint folder (.../checkpoints/<step>); default: random init",
  )
  p.add_argument("--prompt", required=True, help="prompt text (UTF-8 bytes are the tokens)")
  p.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per row")
  p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
  p.add_argument("--greedy", action="store_true", help="argmax decoding")
  p.add_argument("--batch", type=int, default=1, help="rows (the prompt repeated)")
  p.add_argument("--seed", type=int, default=0, help="seed of the init and the sampling")
  p.add_argument(
    "--capacity", type=int, default=None, help="cache capacity (default: prompt + new tokens)"
  )
  p.add_argument(
    "--offload",
    action="store_true",
    help="NOSA layers: K/V/c in host memory, selected blocks copied per step",
  )
  p.add_argument(
    "--offload-copy",
    default="kernel",
    choices=("kernel", "xla"),
    help="with --offload: how the missing blocks reach the device slots (the zero-copy "
    "Pallas kernel, or XLA's gather on the host store)",
  )
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (0, or 2 after printing one ``error:`` line)."""
  try:
    return _main(argv)
  except _UsageError as e:
    return _fail(e)
  except Exception as e:  # noqa: BLE001 - the CLI's contract: one line, never a traceback
    return _fail(f"{type(e).__name__}: {e}")


def _main(argv) -> int:
  args = _parse_args(argv)
  from train.config import load_config

  try:
    config = load_config(args.config, args.overrides)
  except FileNotFoundError as e:
    why = e.strerror or e
    return _fail(f"--config: expected a readable YAML file, got {args.config!r} ({why})")
  except (ValueError, TypeError) as e:
    return _fail(e)
  prompt = list(args.prompt.encode("utf-8"))
  mc = config.model
  problems = []
  if not prompt:
    problems.append("--prompt: expected at least one byte, got ''")
  if max(prompt, default=0) >= mc.vocab_size:
    problems.append(
      f"--prompt: expected bytes below model.vocab_size={mc.vocab_size}, got {max(prompt)}"
    )
  if args.max_new_tokens < 1:
    problems.append(f"--max-new-tokens: expected a positive int, got {args.max_new_tokens}")
  if args.batch < 1:
    problems.append(f"--batch: expected a positive int, got {args.batch}")
  capacity = args.capacity or len(prompt) + max(args.max_new_tokens, 0)
  if problems:
    return _fail("; ".join(problems))

  import jax
  from flax import nnx

  from sparse_attention_jax.generation.generator import Generator
  from sparse_attention_jax.nn import DecoderLM
  from sparse_attention_jax.offload import OffloadConfig

  model = DecoderLM(mc, rngs=nnx.Rngs(args.seed))
  source = "random init"
  if args.checkpoint:
    from train import checkpoint

    try:
      step = checkpoint.restore(args.checkpoint, model)
    except Exception as e:  # noqa: BLE001 - unreadable, corrupt or mismatched: one line
      return _fail(f"--checkpoint: could not restore {args.checkpoint}: {type(e).__name__}: {e}")
    source = f"checkpoint {args.checkpoint} (step {step})"
  try:
    gen = Generator(
      model,
      batch=args.batch,
      capacity=capacity,
      offload=OffloadConfig(copy=args.offload_copy) if args.offload else False,
    )
    out = gen.generate(
      [prompt] * args.batch,
      args.max_new_tokens,
      temperature=args.temperature,
      top_p=args.top_p,
      greedy=args.greedy,
      seed=args.seed,
    )
  except (ValueError, NotImplementedError) as e:
    return _fail(e)
  dev = jax.devices()[0]
  mode = "greedy" if args.greedy else f"temperature {args.temperature:g}, top-p {args.top_p:g}"
  print(f"model: layers {list(mc.layer_kinds())}, {source}, {dev.platform} ({dev.device_kind})")
  print(
    f"batch {args.batch}, prompt {len(prompt)} tokens, {args.max_new_tokens} new tokens, "
    f"capacity {capacity}, {mode}"
  )
  for r in range(args.batch):
    text = bytes(int(t) % 256 for t in out.tokens[r]).decode("utf-8", errors="replace")
    print("-" * 72)
    print(args.prompt + text)
  print("-" * 72)
  print(f"prefill  {out.prefill_tokens_per_s:,.0f} tokens/s ({out.prefill_s * 1e3:.1f} ms)")
  print(
    f"decode   {out.decode_tokens_per_s:,.0f} tokens/s ({out.decode_s * 1e3:.1f} ms for "
    f"{max(args.max_new_tokens - 1, 0)} steps x {args.batch} rows)"
  )
  print(f"compile  {out.compile_s:.1f} s")
  if out.offload is not None:
    t = out.offload.total
    print(
      f"offload  {t['transferred']} blocks transferred over {len(out.offload.per_step)} "
      f"steps ({t['bytes'] / 2**20:.2f} MiB host -> device), hit rate {t['hit_rate']:.3f}, "
      f"{out.offload.slots} device slots per sequence and KV head "
      f"({out.offload.host_memory_kind})"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
