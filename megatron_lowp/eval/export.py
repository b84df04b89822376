"""`megatron-lowp export CHECKPOINT --format hf --out DIR`: a Hugging Face Llama checkpoint
(model.safetensors, config.json, generation_config.json, the sentencepiece tokenizer) that
`transformers.LlamaForCausalLM.from_pretrained(DIR)` loads.

Our Llama maps 1:1: RoPE is in HF's rotate-half layout; the fused qkv projection splits into
q_proj/k_proj/v_proj; gate/up/down are HF's gate_proj/up_proj/down_proj. Weights are exported in
FP32 as trained (the master weights): a low-precision recipe's quantization is a property of how it
computes, not of the stored weights. nGPT has no Hugging Face class, so it is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.eval.evaluate import load_model
from megatron_lowp.model.llama import ffn_hidden_size


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    n_kv = cfg.n_kv_heads or cfg.n_heads
    head = cfg.d_model // cfg.n_heads
    sizes = [cfg.n_heads * head, n_kv * head, n_kv * head]
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(sizes, dim=0)
        out.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "mlp.gate_proj.weight": block.mlp.gate.weight, p + "mlp.up_proj.weight": block.mlp.up.weight,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
            p + "input_layernorm.weight": block.attn_norm.weight, p + "post_attention_layernorm.weight": block.mlp_norm.weight,
        })
    if cfg.tie_embeddings:
        del out["lm_head.weight"]
    return {k: v.detach().to(torch.float32).contiguous().cpu().clone() for k, v in out.items()}


def hf_config(cfg, tokenizer_bos: int, tokenizer_eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": ffn_hidden_size(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer_bos, "eos_token_id": tokenizer_eos, "torch_dtype": "float32",
    }


def _require_hf_packages() -> None:
    """One install hint instead of a ModuleNotFoundError when the [eval] extra is missing."""
    try:
        import google.protobuf  # noqa: F401  (sentencepiece's model settings, for the tokenizer)
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401  (installed with transformers)
    except ImportError as e:
        raise UserError(f"export --format hf needs {e.name or 'safetensors/tokenizers/protobuf'}, which is not "
                        "installed: pip install 'megatron-lowp[eval]'") from None


def export_hf(path: Path, out: Path) -> Path:
    _require_hf_packages()
    from safetensors.torch import save_file

    from megatron_lowp.data import Tokenizer
    from megatron_lowp.eval.hf_tokenizer import build_hf_tokenizer, check_same_ids, tokenizer_config

    loaded = load_model(path, precision="bf16")  # the weights as trained; linears plain
    cfg = loaded.cfg
    if cfg.model.arch != "llama":
        raise UserError(f"export --format hf: model.arch '{cfg.model.arch}' has no Hugging Face class (only llama "
                        "exports); keep using megatron-lowp eval/generate for it")
    tok = Tokenizer.load(cfg.data.tokenizer)
    hf_tok = build_hf_tokenizer(tok)
    check_same_ids(hf_tok, tok)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(loaded.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    # Generation from nothing starts where every training document did: after EOS.
    (out / "config.json").write_text(json.dumps(hf_config(cfg.model, tok.eos_id, tok.eos_id), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}))
    shutil.copyfile(tok.path, out / "tokenizer.model")  # the sentencepiece original, for other tools
    hf_tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, cfg.model.max_seq_len), indent=1))
    return out
