/*
 * DINOv2 pretraining on the tiles of every slide that TILE tiled (--tiled-only: a slide TILE could not
 * tile is left out, not tiled again inside the GPU job): one multi-GPU (optionally multi-node) job. It reads
 * the tiles at the pipeline's tile setting (--tile_px, --target_mpp), whatever the config says: fm-train
 * refuses a config whose setting differs from the tiles it is given.
 * On SLURM, conf/slurm.config requests --nodes/--ntasks-per-node/--gres and sets ext.launcher to
 * `srun`, which starts one process per GPU; Lightning reads the SLURM variables from there.
 */
process PATHOLOGY_PRETRAIN {
    label 'process_gpu_multi'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'pretrain/export/*'

    input:
    path samplesheet
    path tile_dirs, stageAs: 'tiles/*'
    path config

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
    ${launcher} fm-train pathology \\
        --cohorts csv:${samplesheet} \\
        --tiles-dir tiles \\
        --tiled-only \\
        --set pathology.tile_px=${params.tile_px} \\
        --set pathology.target_mpp=${params.target_mpp} \\
        --output-dir pretrain \\
        --devices ${params.pretrain_devices} \\
        --nodes ${params.pretrain_nodes} \\
        --strategy ${params.pretrain_strategy} \\
        --num-workers ${task.cpus} \\
        ${config_arg} ${steps_arg} ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p pretrain/export
    touch pretrain/export/teacher.safetensors
    """
}
