# The miniature world's data: its problems and benchmarks (opd.worlds.miniature.generator), then its tokenizer.


rule toy_data:
    output:
        expand(res("data/{name}.jsonl"), name=WORLD.local_tasks),
        sft=res("data/sft.jsonl"),
        prompts=res("data/train_prompts.jsonl"),
    log:
        res("logs/toy_data.log"),
    conda:
        ENV_CORE
    params:
        w=config["world"],
        seed=config["seed"],
        out_dir=lambda wc, output: os.path.dirname(output.sft),
    shell:
        "python -m opd.worlds.miniature.generator --out-dir {params.out_dir} --n-bench {params.w[n_bench]} --n-sft {params.w[n_sft]}"
        " --n-prompts {params.w[n_prompts]} --max-value {params.w[max_value]}"
        " --ood-fraction {params.w[ood_fraction]} --seed {params.seed} --study $OPD_STUDY > {log} 2>&1"


rule tokenizer:
    input:
        rules.toy_data.output.sft,
    output:
        res("tokenizer/tokenizer.json"),
    log:
        res("logs/tokenizer.log"),
    conda:
        ENV_CORE
    params:
        vocab=config["world"]["vocab_size"],
        out_dir=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "python -m opd.worlds.miniature.tokenizer --corpus {input} --vocab-size {params.vocab}"
        " --out-dir {params.out_dir} --study $OPD_STUDY > {log} 2>&1"
