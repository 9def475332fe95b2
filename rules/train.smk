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
        launcher=fw.train_launcher(CFG),
    resources:
        gpu=CFG.train_processes,
    log:
        "logs/train_lora.log",
    shell:
        "{params.launcher} train lora {params.flags:q} --cache_dir results --auto_resume > {log:q} 2>&1"


# Full fine-tuning (config.yaml's train_full:, flux_train.py's flags) and ControlNet training
# (train_controlnet:, flux_train_control_net.py's flags; the dataset needs conditioning_data_dir). Both resume
# by themselves after an interruption, as train_lora does.
rule train_full:
    input:
        report=ancient(VALIDATE_REPORT),
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
    output:
        fw.method_output(CFG, "full"),
    params:
        flags=fw.method_argv(CFG, "full"),
        impl=FLUXPIPE_VERSION,
    resources:
        gpu=1,
    log:
        "logs/train_full.log",
    shell:
        "fluxpipe train full {params.flags:q} --cache_dir results --auto_resume > {log:q} 2>&1"


rule train_controlnet:
    input:
        report=ancient(VALIDATE_REPORT),
        latents=fw.LATENT_SUMMARY,
        text=fw.TEXT_SUMMARY,
    output:
        fw.method_output(CFG, "controlnet"),
    params:
        flags=fw.method_argv(CFG, "controlnet"),
        impl=FLUXPIPE_VERSION,
    resources:
        gpu=1,
    log:
        "logs/train_controlnet.log",
    shell:
        "fluxpipe train controlnet {params.flags:q} --cache_dir results --auto_resume > {log:q} 2>&1"
