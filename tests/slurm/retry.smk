# Failing jobs under the SLURM profile (tests/test_slurm.py): `flaky` fails on its first attempt and
# succeeds on the second; `always_fails` fails on every attempt. Each attempt appends a line to a file.


rule all:
    input:
        "flaky.done",
        "always_fails.done",


rule flaky:
    output:
        "flaky.done",
    resources:
        mem_mb=200,
        runtime=5,
        attempt=lambda wildcards, attempt: attempt,
    shell:
        "echo attempt {resources.attempt} job $SLURM_JOB_ID >> flaky.attempts;"
        " test {resources.attempt} -ge 2; touch {output}"


rule always_fails:
    output:
        "always_fails.done",
    resources:
        mem_mb=200,
        runtime=5,
        attempt=lambda wildcards, attempt: attempt,
    shell:
        "echo attempt {resources.attempt} job $SLURM_JOB_ID >> always_fails.attempts; exit 3"
