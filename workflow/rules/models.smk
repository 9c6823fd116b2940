# The miniature world's teacher and students: supervised fine-tuning from random weights.


rule sft_model:
    input:
        data=rules.toy_data.output.sft,
        tokenizer=rules.tokenizer.output,
    output:
        "results/models/{model}/model.safetensors",
    params:
        args=sft_args,
        out_dir=lambda wc: model_dir(wc.model),
        seed=config["seed"],
    threads: THREADS
    resources:
        mem_mb=RES["model"]["mem_mb"],
        runtime=RES["model"]["runtime"],
        gpu=RES["model"]["gpu"],
    log:
        "results/logs/sft/{model}.log",
    benchmark:
        "results/benchmarks/sft/{model}.tsv"
    shell:
        "python -m opd.sft --data {input.data} --tokenizer results/tokenizer --out-dir {params.out_dir}"
        " --name {wildcards.model} {params.args} --seed {params.seed} --threads {threads}"
        " --study $OPD_STUDY > {log} 2>&1"
