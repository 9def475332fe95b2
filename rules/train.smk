# Training on the cached data: one `fluxpipe train lora` job with the reference trainer's flags.
# A rerun after an interruption resumes from the newest state in results/train/lora/ (same settings and data).


rule train_lora:
    input:
        report=ancient(VALIDATE_REPORT),
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
    output:
        fw.lora_output(CFG),
    params:
        flags=fw.train_lora_argv(CFG),
    resources:
        gpu=1,
    log:
        "logs/train_lora.log",
    shell:
        "fluxpipe train lora {params.flags:q} --cache_dir results --auto_resume > {log:q} 2>&1"
