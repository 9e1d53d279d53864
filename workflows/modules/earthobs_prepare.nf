/*
 * Packs one split of an evaluation data set into the shared cache `packed_dir`
 * (<packed_dir>/<pack_as>/<sensor>/<split>), so that EVAL memory-maps it instead of decoding
 * GeoTIFFs on the GPU node. Packing is atomic and locked, and EVAL packs whatever is missing itself,
 * so this step only moves CPU work off the GPU jobs; the cache outlives the work directory.
 */
process EARTHOBS_PREPARE {
    tag "${dataset}/${split}"
    label 'process_medium'

    input:
    tuple val(dataset), val(pack_as), val(root), val(split), val(fraction)
    val packed_dir

    output:
    tuple val(dataset), val(root), emit: packed
    path "tracking", optional: true, emit: tracking

    script:
    def fraction_arg = fraction ? "--fraction ${fraction}" : ''
    def tracking_env = params.tracking_direct ? '' : 'export FM_TRACKING_DIR="$PWD/tracking"'
    def tracking_arg = params.tracking_direct ? "--tracking-uri ${params.tracking_uri}" : ''
    def args = task.ext.args ?: ''
    """
    ${tracking_env}
    fm-prepare earthobs ${pack_as} \\
        --root ${root} \\
        --split ${split} \\
        --sensor ${params.modality} \\
        --seed ${params.seed} \\
        --num-workers ${task.cpus} \\
        --output-dir ${packed_dir} \\
        ${fraction_arg} ${args} ${tracking_arg}
    """

    stub:
    """
    mkdir -p tracking
    mkdir -p ${packed_dir}/${pack_as}/${params.modality}/${split}
    """
}
