/*
 * The generated demo cohort as a samplesheet, so that `-profile test` starts from a CSV like any
 * real run. The slides themselves are generated once into $FM_CACHE_DIR; the CSV holds absolute paths.
 * Nothing is tiled here: the TILE tasks do that, one slide each.
 */
process PATHOLOGY_SAMPLESHEET {
    label 'process_low'
    publishDir "${params.outdir}", mode: params.publish_dir_mode

    output:
    path "samplesheet.csv", emit: samplesheet

    script:
    """
    fm-prepare pathology --cohorts demo --write-samplesheet samplesheet.csv --samplesheet-only --tracking-uri none
    """

    stub:
    """
    printf 'slide_id,patient_id,slide_path,label\\nSTUB-00,STUB-P0,/stub/STUB-00.tif,a\\nSTUB-01,STUB-P1,/stub/STUB-01.tif,b\\n' > samplesheet.csv
    """
}
