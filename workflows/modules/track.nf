/*
 * Logs every task's offline run folder to MLflow in ONE process: many SLURM jobs writing one SQLite
 * file on a network file system corrupt it, one writer at the end does not.
 */
process TRACK {
    label 'process_single'

    input:
    path runs, stageAs: 'runs??/*'
    val tracking_uri

    output:
    path "imported.txt", emit: imported

    script:
    """
    fm-track import runs*/tracking --tracking-uri ${tracking_uri} > imported.txt
    """

    stub:
    """
    ls -d runs*/tracking > imported.txt
    """
}
