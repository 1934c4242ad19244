"""``moqe-compile inspect`` for ``causal-lm`` bundles."""

from __future__ import annotations

from moqe_compile.target import frontier_section, summary_lines


def _moe_model_line(moe: dict | None) -> list[str]:
    if not moe:
        return []
    return [f"moe         {moe['layout']}: {len(moe['moe_layers'])} MoE layers x {moe['num_experts']} experts "
            f"(top-{moe['top_k']}), {moe['expert_params'] / 1e6:.2f}M routed-expert params"
            f"{', shared expert' if moe.get('shared_expert') else ''}; gates FP; exported dense"]


def _moe_bits_lines(a: dict | None) -> list[str]:
    """An expert-wise bit allocation (causal_lm/moe_bits.py): criterion, fallback, bits per layer."""
    if not a:
        return []
    pad = " " * 27
    crit = a["criterion"] + (f" (asked {a['requested']})" if a["requested"] != a["criterion"] else "")
    size = a.get("expert_weight_bytes", {})
    L = [f"{pad}moe bits {crit}: mean {a['mean_bits']:.3f} (target {a['target_bits']}) over widths {a['widths']}; "
         f"other MatMuls {a.get('non_expert_bits')}-bit; gates FP"
         + (f"; experts {size['allocated'] / 1e6:.2f} MB (fp32 {size['fp32'] / 1e6:.2f} MB)" if size else "")]
    if a.get("fallback"):
        L.append(f"{pad}FALLBACK {a['fallback']}")
    for row in a["per_layer"]:
        L.append(f"{pad}  layer {row['layer']:>2}: " + " ".join(str(b) for b in row["bits"]))
    return L


# Bundles built before the two tasks shared one gate wrote "single-expert" for "single".
GATE_DECISIONS = {"single-expert": "single"}


def gate_decision(gate: dict) -> str:
    """The gate's decision as today's bundles write it (``"routed"`` or ``"single"``)."""
    return GATE_DECISIONS.get(gate["decision"], gate["decision"])


def render(b) -> str:
    """The summary of a read causal-LM bundle ``b`` (``bundle.Bundle``)."""
    m = b.manifest
    d, r, g = m["model"]["decoder"], m["routing"], m["router"]["gate"]
    L = [f"bundle      {b.root}",
         f"schema      v{m['schema_version']}  built {m['created_at']} with moqe-compile {m['created_with']['moqe_compile']}"
         f" (onnxruntime {m['created_with']['onnxruntime']}, transformers {m['created_with'].get('transformers')})",
         f"model       {m['model']['source']}:{m['model']['origin']}  task causal-lm",
         f"decoder     {d['layers']} layers, d {d['hidden_size']}, {d['kv_heads']} KV heads x {d['head_dim']}, "
         f"vocab {d['vocab_size']}, max positions {d['max_positions']}; one graph (empty past = scoring)",
         *_moe_model_line(m["model"].get("moe")),
         f"tokenizer   {m['task']['tokenizer']['path']} (eos {m['task']['eos_token_id']})",
         "data        " + "; ".join(f"{s} {v['windows']} windows {v['per_corpus']}" for s, v in m["splits"].items()
                                    if isinstance(v, dict)) + f" ({m['splits']['seq_len']} tokens, disjoint by document)",
         f"routing     {'ROUTED' if r['enabled'] else 'single expert ' + r['default_expert']} per sequence on "
         f"{r['routed_on']}; default (best on router_val) {r['default_expert']}",
         f"gate        {gate_decision(g)}{' FORCED' if g.get('forced') else ''}: {g['reason']}",
         *summary_lines(m),
         "experts"]
    for e in m["experts"]:
        rc, v = e["recipe"], e["variants"]["onnxruntime-cpu"]
        t = e.get("metrics", {}).get("test", {})
        knobs = [f"{rc['scheme']}", f"{rc['bits']}-bit", f"weights={rc['weights']}"]
        knobs += [f"block={rc['block_size']}"] if rc["scheme"] == "nbits" else []
        knobs += [f"smoothquant={rc['smoothquant_alpha']}"] if rc["smoothquant_alpha"] else []
        knobs += ["awq"] if rc["awq"] else []
        L.append(f"  {e['name']:<24} {' '.join(knobs)}")
        if t:
            L.append(f"  {'':<24} test ppl {t['perplexity']:.3f} [{t['perplexity_ci95'][0]:.3f}, "
                     f"{t['perplexity_ci95'][1]:.3f}]  KL to FP {t['kl_to_fp']:.4g}  FP top-1 agree "
                     f"{t['fp_top1_agreement']:.4f}")
        L.append(f"  {'':<24} kernels {v['kernels']}")
        L += _moe_bits_lines(e.get("moe_bits"))
    L += frontier_section(b.root, m)
    total = sum(f["size"] for f in m["files"].values())
    L.append(f"files       {len(m['files'])} files, {total / 1e6:.1f} MB, sha256-verified")
    return "\n".join(L)
