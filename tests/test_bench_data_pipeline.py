"""``python -m tim_jax.bench.data_pipeline``: generated records (with images when asked) through
the training iterator, one table row per worker count."""
import re

from tim_jax.bench import data_pipeline


def test_generated_records_with_images_are_read_and_timed(capsys):
    assert data_pipeline.main(["--records", "48", "--shards", "3", "--shape", "4,4,4", "--batch", "16",
                               "--workers", "0", "--batches", "2", "--warmup", "1", "--images",
                               "--process-count", "2", "--step-images-per-s", "100"]) == 0
    out = capsys.readouterr().out
    assert "wrote 48 records of (4, 4, 4) float16 in 3 shards" in out
    assert "host batch 8 rows (global 16, 2 process(es))" in out and "needs 50 samples/s per host" in out
    rows = [ln for ln in out.splitlines() if re.match(r"\| 0 \| \d+ \|", ln)]
    assert len(rows) == 1, out


def test_records_carry_the_images_the_iterator_decodes(tmp_path):
    from tim_jax.data import arrayrecord

    path = data_pipeline.write_random_records(str(tmp_path), num_records=8, shape=(2, 3, 4), shards=2,
                                              image_format="png")
    it = arrayrecord.make_arrayrecord_iterator(path, global_batch_size=4, seed=0, process_index=0,
                                               process_count=1, num_workers=0, read_threads=1,
                                               read_buffer=1, null_label=1000, images=True)
    try:
        batch = next(it)
    finally:
        it.close()
    assert batch["x"].shape == (4, 2, 3, 4) and batch["image"].shape == (4, 16, 24, 3)
