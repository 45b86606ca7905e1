"""Offline XCOPA / XNLI benchmarks: baseline vs intervened, alpha calibrated on held-out data.

    tasks        evaluation files -> prompts (lm-evaluation-harness templates or a
                 multiple-choice prompt), one `Example` per item
    scoring      token ids, steered positions, summed option log-likelihoods from
                 vLLM (the serving path) or from HF transformers (the reference)
    calibration  alpha chosen per language from calibration items only
    stats        tests of baseline vs intervened on the same items (exact McNemar, non-inferiority);
                 the bootstrap CIs are the shared core's (`lingosteer.stats`)
    report       the report dict, its JSON / markdown / PNG files
    runner       ties them together around one vLLM engine (`lingosteer bench`: lingosteer.entrypoints.bench)
"""
