/*
 * Frozen-encoder evaluation on one data set (BigEarthNet: multi-label micro mAP on the saved
 * training fraction; EuroSAT: accuracy), reading the packed splits from `packed_dir`.
 */
process EARTHOBS_EVAL {
    tag "${dataset}"
    label 'process_gpu'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: "eval_${dataset}/*"

    input:
    tuple val(dataset), val(root), val(train_fraction)
    val packed_dir
    val encoder
    path checkpoint
    path weights

    output:
    tuple val(dataset), path("eval_${dataset}/results.csv"), emit: results
    path "tracking", optional: true, emit: tracking

    script:
    def encoder_arg = checkpoint ? "--encoder ${checkpoint}" : "--encoder ${encoder}"
    def weights_arg = weights ? "--weights ${weights}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-eval earthobs ${dataset} \\
        ${encoder_arg} ${weights_arg} \\
        --root ${root} \\
        --packed ${packed_dir} \\
        --modality ${params.modality} \\
        --protocol ${params.protocol} \\
        --train-fraction ${train_fraction} \\
        --seed ${params.seed} \\
        --num-workers ${task.cpus} \\
        --output-dir eval_${dataset} \\
        ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p eval_${dataset}
    touch eval_${dataset}/results.csv
    """
}
