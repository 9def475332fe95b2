# Evaluation: every saved LoRA of the run (and the base model) on fixed prompts x seeds, loss curves,
# metrics.json; all of it in `snakemake --report report.html`.
import os


rule evaluate_samples:
    input:
        lora=fw.lora_output(CFG),
        report=validated,
        files=fw.evaluate_inputs(CFG),
        manifest=ancient(fw.MANIFEST),
    output:
        grid=report(
            f"{fw.evaluate_dir(CFG)}/grid.png",
            caption="../report/grid.rst",
            category="Samples",
            labels={"figure": "all checkpoints side by side"},
        ),
        checkpoints=report(
            directory(f"{fw.evaluate_dir(CFG)}/checkpoints"),
            patterns=["{checkpoint}.png"],
            caption="../report/checkpoint.rst",
            category="Samples",
            labels={"figure": "checkpoint {checkpoint}"},
        ),
        loss=report(
            f"{fw.evaluate_dir(CFG)}/loss.png",
            caption="../report/loss.rst",
            category="Curves",
            labels={"figure": "training loss"},
        ),
        validation=report(
            f"{fw.evaluate_dir(CFG)}/validation_loss.png",
            caption="../report/validation_loss.rst",
            category="Curves",
            labels={"figure": "validation loss"},
        ),
        distance=report(
            f"{fw.evaluate_dir(CFG)}/train_distance.png",
            caption="../report/train_distance.rst",
            category="Curves",
            labels={"figure": "sample distance to the training images"},
        ),
        metrics=report(
            f"{fw.evaluate_dir(CFG)}/metrics.json",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"figure": "metrics.json"},
        ),
    params:
        out=lambda wildcards, output: os.path.dirname(output.grid),
        train_dir=lambda wildcards, input: os.path.dirname(input.lora),
        impl=FLUXPIPE_VERSION,
        settings=validated_settings(fw.evaluate_params),
    threads: all_cores()
    resources:
        gpu=1,
    log:
        "logs/evaluate_samples.log",
    shell:
        "fluxpipe evaluate --config-json \"$FLUXPIPE_CONFIG_JSON\" --train-dir {params.train_dir:q} --out {params.out:q} --manifest {input.manifest:q} > {log:q} 2>&1"
