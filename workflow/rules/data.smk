# Training prompts and benchmark data: the miniature world's (made here, with its tokenizer), or the paper
# study's DAPO-Math-17k prompts (downloaded and deduplicated; lm-eval fetches its own benchmark data).

if DATA["source"] == "miniature":


    rule toy_data:
        output:
            expand("results/data/{name}.jsonl", name=WORLD_BENCHMARKS),
            sft="results/data/sft.jsonl",
            prompts="results/data/train_prompts.jsonl",
        params:
            w=config["world"],
            seed=config["seed"],
        conda:
            ENV_CORE
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
        conda:
            ENV_CORE
        log:
            "results/logs/tokenizer.log",
        shell:
            "python -m opd.tokenizer --corpus {input} --vocab-size {params.vocab}"
            " --out-dir results/tokenizer --study $OPD_STUDY > {log} 2>&1"

else:

    rule dapo_data:
        output:
            prompts=PROMPTS,
            stats="results/data/train_prompts.stats.json",
        params:
            args=dapo_args,
        conda:
            ENV_CORE
        log:
            "results/logs/dapo_data.log",
        shell:
            "python -m opd.dapo {params.args} --out {output.prompts} --stats {output.stats} > {log} 2>&1"
