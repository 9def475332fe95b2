# The run report of each training method (`fluxpipe run-report`): settings, model files with sha256, timings and
# peak memory per epoch, curves, validation loss per grid column, metrics as tables and a dataset preview; shown
# by `snakemake --report report.html` under the method's category. Run e.g.
# `snakemake --cores 1 run_report_lora` (or run_reports for all three) before `snakemake --report`.
import os
import shlex


rule run_report_lora:
    input:
        trained=fw.lora_output(CFG),
        report=validated,
        manifest=ancient(fw.MANIFEST),
        metrics=f"{fw.evaluate_dir(CFG)}/metrics.json",
    output:
        **run_report_outputs("lora", "LoRA run"),
    params:
        method="lora",
        out=lambda wildcards, output: os.path.dirname(output.html),
        metrics=lambda wildcards, input: f"--metrics {shlex.quote(input.metrics)}",
        flags=fw.training_argv(CFG, "lora"),
        impl=FLUXPIPE_VERSION,
    log:
        "logs/run_report_lora.log",
    shell:
        RUN_REPORT_SHELL


rule run_report_full:
    input:
        trained=fw.method_output(CFG, "full"),
        report=validated,
        manifest=ancient(fw.MANIFEST),
    output:
        **run_report_outputs("full", "Full fine-tune run"),
    params:
        method="full",
        out=lambda wildcards, output: os.path.dirname(output.html),
        metrics="",
        flags=fw.training_argv(CFG, "full"),
        impl=FLUXPIPE_VERSION,
    log:
        "logs/run_report_full.log",
    shell:
        RUN_REPORT_SHELL


rule run_report_controlnet:
    input:
        trained=fw.method_output(CFG, "controlnet"),
        report=validated,
        manifest=ancient(fw.MANIFEST),
    output:
        **run_report_outputs("controlnet", "ControlNet run"),
    params:
        method="controlnet",
        out=lambda wildcards, output: os.path.dirname(output.html),
        metrics="",
        flags=fw.training_argv(CFG, "controlnet"),
        impl=FLUXPIPE_VERSION,
    log:
        "logs/run_report_controlnet.log",
    shell:
        RUN_REPORT_SHELL


rule run_reports:
    input:
        rules.run_report_lora.output.html,
        rules.run_report_full.output.html,
        rules.run_report_controlnet.output.html,
