# The models: the miniature world's are made by supervised fine-tuning from random weights; hub models
# (the paper study's Qwen3 pairs) are downloaded, safetensors only.


if MINIATURE_MODELS:

    rule sft_model:
        input:
            data=rules.toy_data.output.sft,
            tokenizer=rules.tokenizer.output,
        output:
            res("models/{model}/model.safetensors"),
        log:
            res("logs/sft/{model}.log"),
        benchmark:
            res("benchmarks/sft/{model}.tsv")
        wildcard_constraints:
            model="|".join(MINIATURE_MODELS) or "^$",
        priority: sft_priority
        conda:
            ENV_CORE
        threads: THREADS
        resources:
            mem_mb=RES["model"]["mem_mb"],
            runtime=RES["model"]["runtime"],
            gpu=RES["model"]["gpu"],
        params:
            args=sft_args,
            out_dir=lambda wc: model_dir(wc.model),
            tokenizer_dir=lambda wc, input: os.path.dirname(input.tokenizer[0]),
            seed=lambda wc: sft_seed(wc.model),
        shell:
            "python -m opd.worlds.miniature.sft --data {input.data} --tokenizer {params.tokenizer_dir} --out-dir {params.out_dir}"
            " --name {wildcards.model} {params.args} --seed {params.seed} --threads {threads}"
            " --study $OPD_STUDY > {log} 2>&1"


rule fetch_model:
    output:
        res("models/{model}/FETCHED.json"),
    log:
        res("logs/fetch/{model}.log"),
    wildcard_constraints:
        model="|".join(HUB_MODELS) or "^$",
    conda:
        ENV_CORE
    resources:
        mem_mb=RES["model"]["mem_mb"],
        runtime=RES["model"]["runtime"],
    params:
        repo=lambda wc: config["models"][wc.model]["hub"],
        revision=lambda wc: config["models"][wc.model]["revision"],
        out_dir=lambda wc: model_dir(wc.model),
    shell:
        "python -m opd.infra.fetch --repo {params.repo} --revision {params.revision} --out-dir {params.out_dir}"
        " --name {wildcards.model} --study $OPD_STUDY > {log} 2>&1"
