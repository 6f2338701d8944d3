"""Convert a diffusers text-to-video snapshot into this project's base checkpoint.

  python -m dreamvideo_jax.convert --src=SNAPSHOT_DIR --dst=OUT_DIR [--overwrite]

SNAPSHOT_DIR holds `unet/ vae/ text_encoder/ [tokenizer/]` (diffusers layout, e.g. text-to-video-ms-1.7b), each
with config.json and safetensors (single, sharded, or an fp16/bf16 variant). Any component can be given
separately instead: `--unet=PATH` (a folder, or one `.safetensors` file in diffusers or original ModelScope
layout, with `--unet_config=config.json` unless it is the ms-1.7b architecture), `--vae=DIR`,
`--text_encoder=DIR`, `--tokenizer=DIR` (absent: the CLIP tokenizer is built from open-clip-torch's vocabulary).

OUT_DIR receives the base checkpoint (orbax parameters of unet/text_encoder/vae + model_config.json; use it as
the training config's `init_from`), `tokenizer/` and `conversion.json`. OUT_DIR must not be, contain or lie inside
an input (SNAPSHOT_DIR or a component). Exit status 0 on success, 1 with a one-line `error:` message on bad input
(missing files, pickles, truncated files, mismatched weights, ...), 2 for bad flags (e.g. such an OUT_DIR).
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from absl import flags


def _flags() -> flags.FlagValues:
    """The command's flags, in a FlagValues of their own (so `main` can be called more than once)."""
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("src", None, "Snapshot folder with unet/ vae/ text_encoder/ [tokenizer/].", **d)
    flags.DEFINE_string("dst", None, "Output folder (must be empty or absent unless --overwrite).", **d)
    flags.DEFINE_string("unet", None, "U-Net folder or single .safetensors file (overrides SRC/unet).", **d)
    flags.DEFINE_string("unet_config", None, "config.json for a single-file U-Net (default: ms-1.7b).", **d)
    flags.DEFINE_string("vae", None, "VAE folder (overrides SRC/vae).", **d)
    flags.DEFINE_string("text_encoder", None, "CLIP text model folder (overrides SRC/text_encoder).", **d)
    flags.DEFINE_string("tokenizer", None, "Tokenizer folder (overrides SRC/tokenizer).", **d)
    flags.DEFINE_string("variant", None, "Precision variant to read, e.g. fp16 (default: full precision).", **d)
    flags.DEFINE_enum("param_dtype", "float32", ("float32", "bfloat16", "float16"),
                      "dtype of the written parameters.", **d)
    flags.DEFINE_integer("text_output_layer", None, "Text encoder layers to run (default: all).", **d)
    flags.DEFINE_bool("allow_pickle", False, "Read .bin/.pt/.pth with torch.load(weights_only=True) instead of "
                      "refusing them.", **d)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.", **d)
    flags.DEFINE_bool("dry_run", False, "Check names and shapes only; load and write nothing.", **d)
    flags.DEFINE_bool("json", False, "Print the summary as JSON.", **d)
    return fv


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
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = _flags()
    if any(a in ("--help", "-h", "--helpfull") for a in argv):
        print(__doc__ + "\nflags:\n" + fv.get_help())
        return 0
    try:
        rest = fv(["python -m dreamvideo_jax.convert"] + argv)
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments {rest[1:]} (flags are --name=value)")
        if not fv.dst:
            raise flags.Error("--dst is required")
    except flags.Error as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from dreamvideo_jax.convert.snapshot import convert_snapshot
    from dreamvideo_jax.convert.torch_to_flax import ConversionError
    from dreamvideo_jax.convert.weights import CheckpointError
    from dreamvideo_jax.errors import InputError

    try:
        summary = convert_snapshot(
            fv.src, fv.dst, unet=fv.unet, vae=fv.vae, text_encoder=fv.text_encoder, tokenizer=fv.tokenizer,
            unet_config=fv.unet_config, variant=fv.variant, allow_pickle=fv.allow_pickle,
            param_dtype=fv.param_dtype, text_output_layer=fv.text_output_layer, overwrite=fv.overwrite,
            dry_run=fv.dry_run)
    except InputError as e:  # a bad argument (e.g. --dst overlapping an input)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConversionError, CheckpointError, OSError, ValueError) as e:
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str) if fv.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
