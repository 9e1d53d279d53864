/*
 * Tissue detection and tile coordinates for ONE slide: many small CPU tasks that each resume on
 * their own. A slide that cannot be tiled is recorded in tiles/manifest.csv and emits no `tiles`, so
 * it is left out downstream; the task itself succeeds (see errorStrategy in conf/base.config).
 */
process PATHOLOGY_TILE {
    tag "${slide_id}"
    label 'process_medium'
    publishDir "${params.outdir}", mode: params.publish_dir_mode, pattern: 'tiles/*/*'

    input:
    val slide_id
    path samplesheet

    output:
    tuple val(slide_id), path("tiles/${slide_id}"), path("tiles/${slide_id}/coords.h5"), optional: true, emit: tiles
    path "tiles/${slide_id}/thumbnail.png", optional: true, emit: thumbnail
    path "tiles/manifest.csv", emit: manifest
    path "tracking", optional: true, emit: tracking

    script:
    def mpp_arg = params.mpp ? "--mpp ${params.mpp}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-prepare pathology \\
        --cohorts csv:${samplesheet} \\
        --slides ${slide_id} \\
        --target-mpp ${params.target_mpp} \\
        --tile-px ${params.tile_px} \\
        --min-tissue ${params.min_tissue} \\
        --output-dir tiles \\
        ${mpp_arg} ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p tiles/${slide_id}
    touch tiles/${slide_id}/coords.h5 tiles/${slide_id}/thumbnail.png
    printf 'slide_id,status\\n${slide_id},ok\\n' > tiles/manifest.csv
    """
}
