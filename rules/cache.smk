# Dataset manifest and the two content-addressed caches (latents, text-encoder outputs).
# Shard jobs depend on the manifest and the validate report through ancient(): what makes a shard rerun is its
# digest param (the manifest rows it must hold) and its settings (the sha256 of the model files it uses, cache
# settings), so an edited image reruns exactly one shard, a new AE file the latent shards only.


checkpoint dataset_manifest:
    input:
        fw.dataset_files(CFG),
    output:
        fw.MANIFEST,
    params:
        settings=fw.manifest_params(CFG),
        shards=f"--latent-shards {LATENT_SHARDS} --text-shards {TEXT_SHARDS}",
    # image decoding and hashing (cache.decode_workers threads at most)
    threads: all_cores()
    log:
        "logs/dataset_manifest.log",
    shell:
        "fluxpipe manifest --config-json \"$FLUXPIPE_CONFIG_JSON\" {params.shards} --out {output:q} > {log:q} 2>&1"


rule latent_shard:
    input:
        manifest=manifest_file,
        report=validated,
    output:
        fw.SHARD_PATTERN.replace("{kind}", "latents"),
    params:
        digest=lambda wildcards: fw.shard_digest(fw.MANIFEST, "latents", wildcards.shard),
        settings=validated_settings(fw.latent_params),
    # the shard jobs share --cores
    threads: shared_cores(LATENT_SHARDS)
    resources:
        gpu=1,
    log:
        "logs/cache_latents/shard-{shard}.log",
    shell:
        "fluxpipe cache-latents --config-json \"$FLUXPIPE_CONFIG_JSON\" --manifest {input.manifest:q} --shard {wildcards.shard}"
        " --out {output:q} > {log:q} 2>&1"


rule cache_latents:
    input:
        manifest=manifest_file,
        shards=fw.shard_paths("latents", LATENT_SHARDS),
    output:
        index=fw.LATENT_INDEX,
        summary=fw.LATENT_SUMMARY,
    threads: 1
    log:
        "logs/cache_latents/index.log",
    shell:
        "fluxpipe cache-index --kind latents --manifest {input.manifest:q} --index {output.index:q}"
        " --summary {output.summary:q} {input.shards:q} > {log:q} 2>&1"


rule text_shard:
    input:
        manifest=manifest_file,
        report=validated,
    output:
        fw.SHARD_PATTERN.replace("{kind}", "text"),
    params:
        digest=lambda wildcards: fw.shard_digest(fw.MANIFEST, "text", wildcards.shard),
        settings=validated_settings(fw.text_params),
    threads: shared_cores(TEXT_SHARDS)
    resources:
        gpu=1,
    log:
        "logs/cache_text/shard-{shard}.log",
    shell:
        "fluxpipe cache-text --config-json \"$FLUXPIPE_CONFIG_JSON\" --manifest {input.manifest:q} --shard {wildcards.shard}"
        " --out {output:q} > {log:q} 2>&1"


rule cache_text_encoder_outputs:
    input:
        manifest=manifest_file,
        shards=fw.shard_paths("text", TEXT_SHARDS),
    output:
        index=fw.TEXT_INDEX,
        summary=fw.TEXT_SUMMARY,
    threads: 1
    log:
        "logs/cache_text/index.log",
    shell:
        "fluxpipe cache-index --kind text --manifest {input.manifest:q} --index {output.index:q}"
        " --summary {output.summary:q} {input.shards:q} > {log:q} 2>&1"
