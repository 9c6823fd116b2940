# The miniature world's data sets and its tokenizer.


rule toy_data:
    output:
        expand("results/data/{name}.jsonl", name=WORLD_BENCHMARKS),
        sft="results/data/sft.jsonl",
        prompts="results/data/train_prompts.jsonl",
    params:
        w=config["world"],
        seed=config["seed"],
    log:
        "results/logs/toy_data.log",
    shell:
        "python -m opd.toy --out-dir results/data --n-bench {params.w[n_bench]} --n-sft {params.w[n_sft]}"
        " --n-prompts {params.w[n_prompts]} --max-value {params.w[max_value]}"
        " --ood-fraction {params.w[ood_fraction]} --seed {params.seed} --study $OPD_STUDY > {log} 2>&1"


rule tokenizer:
    input:
        rules.toy_data.output.sft,
    output:
        "results/tokenizer/tokenizer.json",
    params:
        vocab=config["world"]["vocab_size"],
    log:
        "results/logs/tokenizer.log",
    shell:
        "python -m opd.tokenizer --corpus {input} --vocab-size {params.vocab}"
        " --out-dir results/tokenizer --study $OPD_STUDY > {log} 2>&1"
