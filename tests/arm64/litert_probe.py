"""One ai-edge-litert run inside the arm64 root, for the qemu-user crash study (issue 13).

Loads a prebuilt bundle's ``.tflite`` directly into ``ai_edge_litert.interpreter.Interpreter``
with the given op resolver and thread count, then runs ``set_weights``, ``infer`` and
``train`` in that order, printing a line after each step so that a crash (SIGSEGV kills the
process with no Python traceback) shows which step it hit.

Usage: ``python -I litert_probe.py BUNDLE [--resolver AUTO|BUILTIN_WITHOUT_DEFAULT_DELEGATES|
BUILTIN_REF] [--threads N]``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--resolver", default="AUTO")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", default="set_weights,infer,train")
    args = ap.parse_args(argv)

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from fedmq.models.spec import load_bundle, prebuilt_bundle_path

    bundle = load_bundle(prebuilt_bundle_path(args.bundle))
    spec = bundle.spec
    print("loading", flush=True)
    interp = Interpreter(
        model_path=str(bundle.tflite_path),
        num_threads=args.threads,
        experimental_op_resolver_type=OpResolverType[args.resolver],
    )
    print("loaded", flush=True)
    for step in args.steps.split(","):
        runner = interp.get_signature_runner(step)
        if step == "set_weights":
            out = runner(**{n: bundle.initial_weights[n] for n in spec.weight_names})
        elif step == "infer":
            x = np.zeros((spec.infer_batch, *spec.input_shape), np.float32)
            out = runner(x=x)
        elif step == "train":
            b = spec.train_batch
            out = runner(
                x=np.zeros((b, *spec.input_shape), np.float32),
                y=np.zeros(b, np.int32),
                w=np.ones(b, np.float32),
                lr=np.float32(0.01),
            )
        else:
            out = runner()
        print("ok", step, {k: float(np.asarray(v).ravel()[0]) for k, v in out.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
