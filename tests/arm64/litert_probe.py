"""One ai-edge-litert run inside the arm64 root, for the qemu-user crash study (issue 13).

Loads a prebuilt bundle's ``.tflite`` directly into ``ai_edge_litert.interpreter.Interpreter``
with the given op resolver and thread count, then runs ``set_weights``, ``infer`` and
``train`` in that order, printing a line after each step so that a crash (SIGSEGV kills the
process with no Python traceback) shows which step it hit.

``--no-scalar-resize`` calls each signature without ``ResizeInputTensor`` on its 0-d inputs
(the ``lr`` of ``train``); ``--lr-shape 1`` passes ``lr`` as a one-element vector instead.
Either avoids the aarch64 crash (docs/deployment.md, "Supported device platforms").

Usage: ``python -I litert_probe.py BUNDLE [--resolver AUTO|BUILTIN_WITHOUT_DEFAULT_DELEGATES|
BUILTIN_REF] [--threads N] [--no-scalar-resize] [--lr-shape 1]``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _without_scalar_resize(runner: Any) -> Any:
    """The signature runner's ``__call__`` minus ``ResizeInputTensor`` for 0-d inputs."""
    import numpy as np

    wrapper, sub = runner._interpreter_wrapper, runner._subgraph_index

    def call(**kwargs: Any) -> dict[str, Any]:
        for name, value in kwargs.items():
            if np.ndim(value):
                shape = np.array(np.shape(value), dtype=np.int32)
                wrapper.ResizeInputTensor(runner._inputs[name], shape, False, sub)
        wrapper.AllocateTensors(sub)
        for name, value in kwargs.items():
            wrapper.SetTensor(runner._inputs[name], value, sub)
        wrapper.Invoke(sub)
        return {n: wrapper.GetTensor(i, sub) for n, i in runner._outputs}

    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--resolver", default="AUTO")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", default="set_weights,infer,train")
    ap.add_argument(
        "--lr-shape", type=lambda v: tuple(int(d) for d in v.split(",") if d), default=()
    )
    ap.add_argument(
        "--no-scalar-resize",
        action="store_true",
        help="call the signature without ResizeInputTensor on 0-d inputs",
    )
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
        if args.no_scalar_resize:
            runner = _without_scalar_resize(runner)
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
                lr=np.full(args.lr_shape, 0.01, np.float32),
            )
        else:
            out = runner()
        print("ok", step, {k: float(np.asarray(v).ravel()[0]) for k, v in out.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
