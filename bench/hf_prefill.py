#!/usr/bin/env python3
"""Hugging Face transformers baseline for bench/gpu_prefill.sh: a Llama-3-8B-shaped LlamaForCausalLM
with random bf16 weights (torch SDPA attention), full prefill of one prompt per length (logits of the
last token only, as kvloom computes them), and greedy decode at batch 1 on a prefilled context.
Prints key=value lines like `kvloom gpu-bench`."""
import argparse
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-ctx", type=int, default=8192)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--profile", type=int, default=0,
                    help="after the timed runs, profile one prefill of this many tokens with torch.profiler "
                         "and print the CUDA kernels by total time")
    a = ap.parse_args()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    torch.cuda.synchronize()
    print(f"hf_model transformers={transformers.__version__} torch={torch.__version__} layers={a.layers} "
          f"attn={model.config._attn_implementation} init_ms={(time.time() - t0) * 1e3:.0f}", flush=True)
    D, qd, kd, F = 4096, 4096, 1024, 14336
    lin = D * (qd + 2 * kd) + D * qd + 3 * D * F
    for T in [int(x) for x in a.tokens.split(",") if x]:
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        times = []
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            for r in range(a.reps + 1):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                e.record()
                torch.cuda.synchronize()
                if r > 0:
                    times.append(s.elapsed_time(e))
        best = min(times)
        fl = a.layers * (2 * lin * T + 4 * qd * T * (T + 1) / 2)
        print(f"hf_prefill tokens={T} ms_mean={sum(times) / len(times):.1f} ms_best={best:.1f} "
              f"tflops={fl / best / 1e9:.1f} mfu_h100={fl / best / 1e9 / 989.0:.3f} "
              f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30:.2f}", flush=True)
    if a.profile > 0:
        ids = torch.randint(0, cfg.vocab_size, (1, a.profile), device="cuda")
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        print(f"hf_profile tokens={a.profile}", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=110),
              flush=True)
    if a.decode_ctx > 0 and a.decode_steps > 1:
        ids = torch.randint(0, cfg.vocab_size, (1, a.decode_ctx), device="cuda")
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t = None
            for st in range(a.decode_steps):
                if st == 1:
                    torch.cuda.synchronize()
                    t = time.time()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            ms = (time.time() - t) * 1e3
        n = a.decode_steps - 1
        print(f"hf_decode context={a.decode_ctx} steps={n} ms_per_token={ms / n:.2f} tokens_per_s={1e3 * n / ms:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
