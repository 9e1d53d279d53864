/*
 * Generated Sentinel-2 scenes in the BigEarthNet v1 layout, standing in for BigEarthNet in
 * `-profile test`. Packing the demo's test split generates the scenes under demo_cache/.
 */
process EARTHOBS_DEMO {
    label 'process_low'

    output:
    path "demo_cache/demo/earthobs/bigearthnet-v1-*", type: 'dir', emit: root

    script:
    """
    fm-prepare earthobs demo --root demo_cache --split test --output-dir demo_packed --tracking-uri none
    """

    stub:
    """
    mkdir -p demo_cache/demo/earthobs/bigearthnet-v1-stub
    """
}
