/*
 * Tissue detection and tile coordinates for ONE slide: many small CPU tasks that each resume on
 * their own. A slide that cannot be tiled is recorded in tiles/manifest.csv and emits no `tiles`, so
 * it is left out downstream; the task itself succeeds (see errorStrategy in conf/base.config). Tiling
 * records no MLflow run here (one per slide would flood the store): tiles/manifest.csv is its record.
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

    script:
    def mpp_arg = params.mpp ? "--mpp ${params.mpp}" : ''
    def args = task.ext.args ?: ''
    """
    fm-prepare pathology \\
        --cohorts csv:${samplesheet} \\
        --slides ${slide_id} \\
        --target-mpp ${params.target_mpp} \\
        --tile-px ${params.tile_px} \\
        --min-tissue ${params.min_tissue} \\
        --output-dir tiles \\
        --tracking-uri none \\
        ${mpp_arg} ${args}
    """

    stub:
    """
    mkdir -p tiles/${slide_id}
    touch tiles/${slide_id}/coords.h5 tiles/${slide_id}/thumbnail.png
    printf 'slide_id,status\\n${slide_id},ok\\n' > tiles/manifest.csv
    """
}
