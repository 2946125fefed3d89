"""``fedmq model export ...`` and ``fedmq model info PATH``.

:func:`add_model_subcommands` adds a ``model`` command to the ``fedmq`` argparse
subparsers. Each leaf parser sets ``func`` (``Callable[[argparse.Namespace], int]``, the exit
status); errors are raised as :class:`fedmq.errors.FedmqError` for the caller to report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fedmq.errors import ConfigError
from fedmq.models.spec import ModelBundle, load_bundle, prebuilt_bundle_path, prebuilt_names
from fedmq.models.zoo import PRESETS

__all__ = ["add_model_subcommands", "cmd_export", "cmd_info", "describe_bundle"]


def add_model_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    model = subparsers.add_parser(
        "model", help="export and inspect on-device-trainable model bundles"
    )
    sub = model.add_subparsers(dest="model_command", metavar="{export,info}", required=True)

    exp = sub.add_parser(
        "export",
        help="export a zoo preset or your own Keras model as a bundle "
        "(model.tflite, spec.json, initial.npz); needs TF",
    )
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="zoo preset")
    source.add_argument(
        "--keras",
        metavar="MODEL.keras",
        help="your own Sequential or functional Keras model (see docs/models.md)",
    )
    source.add_argument(
        "--pruned",
        metavar="BUNDLE",
        help="a compact inference-only .tflite of this zoo bundle at --weights (a pruned "
        "federation's model file); --out is the .tflite path (docs/pruning.md)",
    )
    exp.add_argument("--out", required=True, help="output bundle directory (--pruned: file)")
    exp.add_argument("--weights", metavar="NPZ",
                     help="--pruned: the trained weights, e.g. the aggregator's models/vN.npz")

    exp.add_argument("--name", help="model name in spec.json (default: the preset's / model's)")
    select = exp.add_mutually_exclusive_group()
    select.add_argument(
        "--trainable-from",
        metavar="LAYER",
        help="--keras: train and federate this layer and the ones after it; "
        "earlier layers become constants",
    )
    select.add_argument(
        "--train-layers",
        metavar="A,B",
        help="--keras: train and federate only these layers (comma-separated names)",
    )
    exp.add_argument("--seed", type=int, help="initial-weights seed (default 0)")
    exp.add_argument(
        "--head-only",
        action="store_true",
        help="freeze the feature extractor; only the head is trained and federated",
    )
    exp.add_argument("--hidden", type=int, nargs="+", metavar="N", help="dense widths / units")
    exp.add_argument("--channels", type=int, nargs="+", metavar="N", help="cnn conv widths")
    exp.add_argument("--classes", type=int, help="number of classes")
    exp.add_argument("--train-batch", type=int, help="fixed training batch size")
    exp.add_argument("--infer-batch", type=int, help="fixed inference batch size")
    exp.add_argument(
        "--init-weights",
        metavar="NPZ",
        help="start from these weights (any subset), e.g. "
        "a pretrained feature extractor for --head-only",
    )
    exp.set_defaults(func=cmd_export)

    info = sub.add_parser("info", help="describe a bundle: spec, parameters, size, ops check")
    info.add_argument(
        "path", help=f"bundle directory or prebuilt name ({', '.join(prebuilt_names())})"
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "--no-load", action="store_true", help="skip loading the model into the interpreter"
    )
    info.set_defaults(func=cmd_info)
    parser: argparse.ArgumentParser = model
    return parser


_PRESET_ONLY = ("seed", "hidden", "channels", "classes", "init_weights")


def cmd_export(args: argparse.Namespace) -> int:
    if args.pruned:
        return _export_pruned(args)
    if args.weights:
        raise ConfigError("--weights applies to --pruned")
    if args.keras:
        return _export_keras(args)
    if args.trainable_from or args.train_layers:
        raise ConfigError("--trainable-from/--train-layers apply to --keras; use --head-only")
    from fedmq.models.export import export_model
    from fedmq.models.zoo import preset

    cfg = preset(
        args.preset,
        name=args.name,
        seed=args.seed,
        head_only=True if args.head_only else None,
        hidden=tuple(args.hidden) if args.hidden else None,
        channels=tuple(args.channels) if args.channels else None,
        num_classes=args.classes,
        train_batch=args.train_batch,
        infer_batch=args.infer_batch,
    )
    bundle = export_model(cfg, args.out, initial_weights=args.init_weights)
    print(_format(describe_bundle(bundle, load=False)))
    return 0


def _export_keras(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in _PRESET_ONLY if getattr(args, k) is not None]
    if args.head_only:
        given.append("--head-only")
    if given:
        raise ConfigError(
            f"{', '.join(given)}: only for --preset; a Keras model brings its own "
            "architecture and weights (use --trainable-from/--train-layers to freeze layers)"
        )
    from fedmq.models.keras_import import export_keras

    train_layers = None
    if args.train_layers is not None:
        train_layers = [n.strip() for n in args.train_layers.split(",") if n.strip()]
    bundle = export_keras(
        args.keras,
        args.out,
        name=args.name,
        trainable_from=args.trainable_from,
        train_layers=train_layers,
        train_batch=args.train_batch or 32,
        infer_batch=args.infer_batch or 128,
    )
    print(_format(describe_bundle(bundle, load=False)))
    return 0


def _export_pruned(args: argparse.Namespace) -> int:
    if not args.weights:
        raise ConfigError("--pruned needs --weights NPZ (the trained model to export)")
    from fedmq_ops.pruned_export import export_pruned, load_weights_npz

    path = prebuilt_bundle_path(args.pruned) if args.pruned in prebuilt_names() else args.pruned
    bundle = load_bundle(path)
    result = export_pruned(bundle, load_weights_npz(args.weights), args.out)
    print(
        f"{bundle.spec.name}: {100 * result.sparsity:.1f} % of the weights are zero; wrote "
        f"{result.path}: {result.tflite_bytes:,} bytes (the training bundle's .tflite: "
        f"{result.bundle_tflite_bytes:,}; zlib {result.zlib_bytes:,}), infer(x) -> logits, "
        f"ops {', '.join(result.ops)}; LiteRT vs float32: max logit error "
        f"{100 * result.max_logit_error:.2f} %, same class {100 * result.agreement:.1f} %"
    )
    return 0


def describe_bundle(bundle: ModelBundle, *, load: bool = True) -> dict[str, Any]:
    """A JSON-able summary; with ``load`` the model is also opened in the interpreter."""
    from fedmq.models.litert import flex_ops, runtime_name, tflite_op_names

    spec = bundle.spec
    ops = tflite_op_names(bundle.tflite_path)
    out: dict[str, Any] = {
        "path": str(bundle.path),
        "name": spec.name,
        "kind": spec.kind,
        "input": [spec.input_dtype, list(spec.input_shape)],
        "classes": spec.num_classes,
        "train_batch": spec.train_batch,
        "infer_batch": spec.infer_batch,
        "params": spec.num_params,
        "trainable_params": spec.num_trainable_params,
        "weights": {t.name: list(t.shape) for t in spec.weights},
        "trainable": list(spec.trainable),
        "tflite_bytes": bundle.tflite_path.stat().st_size,
        "tflite_sha256": bundle.tflite_sha256(),
        "ops": ops,
        "non_builtin_ops": flex_ops(ops),
        "extra": {k: v for k, v in spec.extra.items() if k != "ops"},
    }
    if load:
        from fedmq.models.litert import TFLiteModel

        TFLiteModel(bundle)  # raises ModelError if the runtime cannot run it
        out["runtime"] = runtime_name()
        out["loads"] = True
    return out


def _format(info: dict[str, Any]) -> str:
    lines = [
        f"{info['name']} ({info['kind']}) at {info['path']}",
        f"  input        {info['input'][0]} {tuple(info['input'][1])}, {info['classes']} classes",
        f"  batches      train {info['train_batch']}, infer {info['infer_batch']}",
        f"  parameters   {info['params']:,} ({info['trainable_params']:,} federated)",
        f"  .tflite      {info['tflite_bytes']:,} bytes, sha256 {info['tflite_sha256'][:16]}...",
        "  weights",
    ]
    trainable = set(info["trainable"])
    for name, shape in info["weights"].items():
        mark = "" if name in trainable else "  (frozen)"
        lines.append(f"    {name:<28} {tuple(shape)}{mark}")
    frozen_layers = info["extra"].get("frozen_layers")
    if frozen_layers:
        lines.append(f"  constants    layers {', '.join(frozen_layers)} (frozen, not federated)")
    bad = info["non_builtin_ops"]
    check = "OK, builtin only" if not bad else f"NEEDS NON-BUILTIN {bad}"
    lines.append(f"  ops          {len(info['ops'])} kinds: {check}")
    if "runtime" in info:
        lines.append(f"  runtime      loads in {info['runtime']}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    path = args.path
    if path in prebuilt_names():
        path = prebuilt_bundle_path(path)
    info = describe_bundle(load_bundle(path), load=not args.no_load)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_format(info))
    return 0 if not info["non_builtin_ops"] else 1
