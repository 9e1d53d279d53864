/*
 * Slide-level evaluation (gated-attention MIL, k folds x seeds ensembled) on the features of every
 * slide. `eval_task` is `demo`, a built-in TCGA task name or `csv:<labels.csv>`, whose file is staged
 * as `labels` (so that -resume sees an edited label file). With --drop_missing (the default), labelled
 * slides without features (failed tiling or extraction, no tissue) are left out and listed.
 */
process PATHOLOGY_EVAL {
    tag "${eval_task}"
    label 'process_gpu'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'eval/*'

    input:
    path features, stageAs: 'features/*'
    val eval_task
    path labels

    output:
    path "eval/results.csv", emit: results
    path "eval/predictions.csv", emit: predictions
    path "eval/summary.md", emit: summary
    path "tracking", optional: true, emit: tracking

    script:
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def task_arg = labels ? "csv:${labels}" : eval_task
    def drop_arg = params.drop_missing ? '--drop-missing' : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-eval pathology ${task_arg} \\
        --features-dir features \\
        --output-dir eval \\
        --folds ${params.folds} \\
        --seeds ${params.seeds} \\
        ${drop_arg} ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p eval
    touch eval/results.csv eval/predictions.csv eval/summary.md
    """
}
