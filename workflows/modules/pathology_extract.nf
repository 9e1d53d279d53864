/*
 * Tile features for one shard of slides (`--extract_shard_size` slides per GPU task), so that the
 * encoder is loaded once per shard rather than once per slide. Writes features/<slide_id>.h5; a slide
 * that fails (or has no tissue tile) has none and is listed, with the reason, in the shard's manifest.
 */
process PATHOLOGY_EXTRACT {
    tag "${shard_id}"
    label 'process_gpu'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'features/*.h5'

    input:
    tuple val(shard_id), val(slide_list), path(tile_dirs, stageAs: 'tiles/*')
    path samplesheet
    val encoder
    path checkpoint
    path weights

    output:
    path "features/*.h5", optional: true, emit: features
    path "features/extract_manifest.csv", emit: manifest
    path "tracking", optional: true, emit: tracking

    script:
    def encoder_arg = checkpoint ? "--encoder ${checkpoint}" : "--encoder ${encoder}"
    def weights_arg = weights ? "--weights ${weights}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-extract pathology \\
        --cohorts csv:${samplesheet} \\
        --tiles-dir tiles \\
        --slides ${slide_list} \\
        ${encoder_arg} ${weights_arg} \\
        --output-dir features \\
        --workers ${task.cpus} \\
        ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p features
    for slide in \$(echo ${slide_list} | tr ',' ' '); do touch features/\$slide.h5; done
    printf 'slide_id,status\\n' > features/extract_manifest.csv
    """
}
