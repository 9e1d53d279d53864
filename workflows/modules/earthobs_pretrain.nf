/*
 * SoftCon continual pretraining (from DINOv2 weights by default) on SSL4EO-S12 or the demo scenes:
 * one multi-GPU (optionally multi-node) job; on SLURM ext.launcher is `srun` (conf/slurm.config).
 * Resumable through `runs_dir` as PATHOLOGY_PRETRAIN: a retry continues from the last checkpoint.
 */
process EARTHOBS_PRETRAIN {
    label 'process_gpu_multi'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'pretrain/export/*'

    input:
    path labels
    path config
    path init_weights
    val runs_dir

    output:
    path "pretrain/export/teacher.safetensors", emit: teacher
    path "tracking", optional: true, emit: tracking

    script:
    def launcher = task.ext.launcher ?: ''
    def init_arg = params.init ? "--init ${params.init}" : ''
    def weights_arg = init_weights ? "--weights ${init_weights}" : ''
    def labels_arg = labels ? "--labels ${labels}" : ''
    def config_arg = config ? "--config ${config}" : ''
    def steps_arg = params.pretrain_max_steps ? "--max-steps ${params.pretrain_max_steps}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    RUN=pretrain
    if [ -n "${runs_dir}" ]; then
        RUN="${runs_dir}/earthobs-\$( (export LC_ALL=C; sha256sum ${labels} ${config} ${init_weights} </dev/null; echo "${params.modality} ${params.pretrain_data} ${params.pretrain_devices} ${params.pretrain_nodes} ${params.pretrain_strategy} ${init_arg} ${steps_arg} ${args}") | sha256sum | cut -c1-16)"
        echo "pretraining in \$RUN (a retry continues there)"
    fi
    ${launcher} fm-train earthobs \\
        --modality ${params.modality} \\
        --data ${params.pretrain_data} \\
        --output-dir "\$RUN" \\
        --devices ${params.pretrain_devices} \\
        --nodes ${params.pretrain_nodes} \\
        --strategy ${params.pretrain_strategy} \\
        --num-workers ${task.cpus} \\
        ${init_arg} ${weights_arg} ${labels_arg} ${config_arg} ${steps_arg} ${args} ${tracking_arg}
    if [ "\$RUN" != pretrain ]; then
        mkdir -p pretrain/export
        cp -r "\$RUN/export/." pretrain/export/
    fi
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p pretrain/export
    touch pretrain/export/teacher.safetensors
    """
}
