"""Convert a diffusers text-to-video snapshot into this project's base checkpoint.

  python -m dreamvideo_jax.convert --src=SNAPSHOT_DIR --dst=OUT_DIR [--overwrite]

SNAPSHOT_DIR holds `unet/ vae/ text_encoder/ [tokenizer/]` (diffusers layout, e.g. text-to-video-ms-1.7b), each
with config.json and safetensors (single, sharded, or an fp16/bf16 variant). Any component can be given
separately instead: `--unet=PATH` (a folder, or one `.safetensors` file in diffusers or original ModelScope
layout, with `--unet_config=config.json` unless it is the ms-1.7b architecture), `--vae=DIR`,
`--text_encoder=DIR`, `--tokenizer=DIR` (absent: the CLIP tokenizer is built from open-clip-torch's vocabulary).

OUT_DIR receives the base checkpoint (orbax parameters of unet/text_encoder/vae + model_config.json; use it as
the training config's `init_from`), `tokenizer/` and `conversion.json`. Exit status 0 on success, 1 with a
one-line `error:` message on bad input (missing files, pickles, truncated files, mismatched weights, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamvideo_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--src", help="snapshot folder with unet/ vae/ text_encoder/ [tokenizer/]")
    p.add_argument("--dst", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--unet", help="U-Net folder or single .safetensors file (overrides SRC/unet)")
    p.add_argument("--unet_config", help="config.json for a single-file U-Net (default: ms-1.7b architecture)")
    p.add_argument("--vae", help="VAE folder (overrides SRC/vae)")
    p.add_argument("--text_encoder", help="CLIP text model folder (overrides SRC/text_encoder)")
    p.add_argument("--tokenizer", help="tokenizer folder (overrides SRC/tokenizer)")
    p.add_argument("--variant", help="precision variant to read, e.g. fp16 (default: full precision if present)")
    p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written parameters (default float32)")
    p.add_argument("--text_output_layer", type=int,
                   help="text encoder layers to run (default: all layers in the checkpoint)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read .bin/.pt/.pth with torch.load(weights_only=True) instead of refusing them")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument("--dry_run", action="store_true", help="check names and shapes only; load and write nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_summary(s: dict) -> str:
    lines = []
    total = 0
    for name, c in s["components"].items():
        total += c["num_params"]
        stored = ", ".join(f"{k} x{v}" for k, v in sorted(c["source_dtypes"].items()))
        ign = f"; ignored {len(c['ignored_keys'])} key(s)" if c["ignored_keys"] else ""
        lines.append(f"  {name:<13} {c['num_params']:>14,} params ({_fmt_count(c['num_params'])})  "
                     f"{c['layout']} layout, stored {stored}{ign}\n  {'':<13} from {c['source']}")
    head = "checked (dry run, nothing written)" if s["dry_run"] else f"wrote {s['dst']}"
    lines.append(f"  {'total':<13} {total:>14,} params ({_fmt_count(total)}), written as {s['param_dtype']}")
    lines.append(f"  {'tokenizer':<13} {s['tokenizer']}")
    return head + "\n" + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    args = _parser().parse_args(argv)
    from dreamvideo_jax.convert.snapshot import convert_snapshot
    from dreamvideo_jax.convert.torch_to_flax import ConversionError
    from dreamvideo_jax.convert.weights import CheckpointError

    try:
        summary = convert_snapshot(
            args.src, args.dst, unet=args.unet, vae=args.vae, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, unet_config=args.unet_config, variant=args.variant,
            allow_pickle=args.allow_pickle, param_dtype=args.param_dtype, text_output_layer=args.text_output_layer,
            overwrite=args.overwrite, dry_run=args.dry_run)
    except (ConversionError, CheckpointError, OSError, ValueError) as e:
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
