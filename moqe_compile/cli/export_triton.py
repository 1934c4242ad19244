"""``moqe-compile export-triton``: a Triton model repository (router + experts + BLS model)."""

from __future__ import annotations


def cmd_export_triton(args) -> int:
    from moqe_compile.cli.common import terminate_as_exception
    from moqe_compile.serving.triton import TritonExport, export_triton

    opts = TritonExport(name=args.name, prefix=args.prefix, variant=args.variant, instance_kind=args.kind,
                        instances=args.instances, max_batch_size=args.max_batch,
                        max_queue_delay_us=args.max_queue_delay_us)
    with terminate_as_exception():  # a killed export removes its staging folder
        out = export_triton(args.bundle, args.output, opts, overwrite=args.force)
    print(f"Triton model repository written to {out}")
    print(f"  serve it with: tritonserver --model-repository {out}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("export-triton", help="write a Triton model repository (router + experts + BLS model)")
    t.add_argument("bundle")
    t.add_argument("-o", "--output", required=True, help="repository directory to write (outside the bundle)")
    t.add_argument("--name", default="", help="name clients call (default: the bundle directory's name); letters, "
                                              "digits, '.', '_', '-', starting with a letter or digit, no '..'")
    t.add_argument("--prefix", default="", help="prefix for the router/expert model names (same characters as "
                                                "--name)")
    t.add_argument("--variant", default="onnxruntime-cpu",
                   help="expert graphs: onnxruntime-cpu (U8S8) or tensorrt (S8S8, for ONNX Runtime CUDA)")
    t.add_argument("--kind", default="KIND_CPU", help="instance kind of router/experts: KIND_CPU | KIND_GPU")
    t.add_argument("--instances", type=int, default=1, help="instances per model (1)")
    t.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every model (64)")
    t.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="Triton dynamic batching delay of the BLS model (2000 us)")
    t.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    t.set_defaults(fn=cmd_export_triton)
