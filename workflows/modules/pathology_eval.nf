/*
 * Slide-level evaluation (gated-attention MIL, k folds x seeds ensembled) on the features of every
 * slide. `eval_task` is `demo`, `csv:<labels.csv>` (absolute path) or a built-in TCGA task name.
 */
process PATHOLOGY_EVAL {
    tag "${eval_task}"
    label 'process_gpu'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'eval/*'

    input:
    path features, stageAs: 'features/*'
    val eval_task

    output:
    path "eval/results.csv", emit: results
    path "eval/predictions.csv", emit: predictions
    path "eval/summary.md", emit: summary
    path "tracking", optional: true, emit: tracking

    script:
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-eval pathology ${eval_task} \\
        --features-dir features \\
        --output-dir eval \\
        --folds ${params.folds} \\
        --seeds ${params.seeds} \\
        ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p eval
    touch eval/results.csv eval/predictions.csv eval/summary.md
    """
}
