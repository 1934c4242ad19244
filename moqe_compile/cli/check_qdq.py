"""``moqe-compile check-qdq``: a Q/DQ ONNX model against a backend's rules (exit 9 on FAIL)."""

from __future__ import annotations

from moqe_compile.cli.common import CHECK_FAILED


def cmd_check_qdq(args) -> int:
    import json
    from pathlib import Path

    from moqe_compile.quantize import check_qdq

    p = Path(args.model)
    res = check_qdq(p, args.target)  # refuses a missing, empty or non-ONNX file, naming it
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{p}: {'OK' if res['ok'] else 'FAIL'} for {args.target}")
        for v in res["violations"]:
            print(f"  - {v}")
        if "kernels" in res:
            print(f"  kernels after ORT optimization: {res['kernels']}")
    return 0 if res["ok"] else CHECK_FAILED


def add_parser(sub) -> None:
    c = sub.add_parser("check-qdq", help="check a Q/DQ ONNX model against a backend's rules")
    c.add_argument("model", help="the Q/DQ ONNX file to check")
    c.add_argument("--target", required=True, help="tensorrt | onnxruntime-cpu")
    c.add_argument("--json", action="store_true", help="print the result as one JSON object")
    c.set_defaults(fn=cmd_check_qdq)
