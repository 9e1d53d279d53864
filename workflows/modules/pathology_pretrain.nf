/*
 * DINOv2 pretraining on the tiles of every slide that TILE tiled (--tiled-only: a slide TILE could not
 * tile is left out, not tiled again inside the GPU job): one multi-GPU (optionally multi-node) job. It reads
 * the tiles at the pipeline's tile setting (--tile_px, --target_mpp), whatever the config says: fm-train
 * refuses a config whose setting differs from the tiles it is given.
 * On SLURM, conf/slurm.config requests --nodes/--ntasks-per-node/--gres and sets ext.launcher to
 * `srun`, which starts one process per GPU; Lightning reads the SLURM variables from there.
 * Resumable: with `runs_dir` (the workflow's --pretrain_runs_dir/<session id>), fm-train runs in a folder
 * of it named by a digest of the task's inputs (file contents, the tiles' coords.h5 among them), so a
 * retried task (killed for time or memory), or the same task after `-resume`, continues from its last
 * checkpoint instead of step 0; the exports are then copied into the task folder. `--num-workers` is
 * left out of the digest: it may grow with the attempt.
 */
process PATHOLOGY_PRETRAIN {
    label 'process_gpu_multi'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'pretrain/export/*'

    input:
    path samplesheet
    path tile_dirs, stageAs: 'tiles/*'
    path config
    val runs_dir

    output:
    path "pretrain/export/teacher.safetensors", emit: teacher
    path "tracking", optional: true, emit: tracking

    script:
    def launcher = task.ext.launcher ?: ''
    def config_arg = config ? "--config ${config}" : ''
    def steps_arg = params.pretrain_max_steps ? "--max-steps ${params.pretrain_max_steps}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    RUN=pretrain
    if [ -n "${runs_dir}" ]; then
        RUN="${runs_dir}/pathology-\$( (export LC_ALL=C; sha256sum ${samplesheet} ${config} tiles/*/coords.h5; echo "${params.tile_px} ${params.target_mpp} ${params.pretrain_devices} ${params.pretrain_nodes} ${params.pretrain_strategy} ${steps_arg} ${args}") | sha256sum | cut -c1-16)"
        echo "pretraining in \$RUN (a retry continues there)"
    fi
    ${launcher} fm-train pathology \\
        --cohorts csv:${samplesheet} \\
        --tiles-dir tiles \\
        --tiled-only \\
        --set pathology.tile_px=${params.tile_px} \\
        --set pathology.target_mpp=${params.target_mpp} \\
        --output-dir "\$RUN" \\
        --devices ${params.pretrain_devices} \\
        --nodes ${params.pretrain_nodes} \\
        --strategy ${params.pretrain_strategy} \\
        --num-workers ${task.cpus} \\
        ${config_arg} ${steps_arg} ${args} ${tracking_arg}
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
