//! Throughput of the repository hot paths: compress+CRC-32C+SHA-256, decompress+CRC-32C, and
//! archive-push of one WAL segment including fsync.
//!
//! `cargo run --release -p pgkeep-repo --example throughput [DIR]`; DIR (default: the system temp
//! dir) should be on the disk a repository would use, since the push figure includes fsync.
//! Figures are MB/s of raw (uncompressed) bytes, MB = 10^6 bytes: by wall clock, and per second
//! of CPU time consumed by the process, which stays meaningful on a machine busy with other work.

use std::io::{BufRead, Cursor};
use std::time::{Duration, Instant};

use pgkeep_repo::{
    fetch_decompressed, store_compressed, Commit, CompressWriter, DecompressReader, LocalStorage,
    MemoryStorage, Storage,
};

const MB: f64 = 1e6;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir(),
    };
    let work = tempfile::tempdir_in(&dir)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cores: {threads}, repository dir: {}",
        work.path().display()
    );

    let size = 256 << 20;
    let sets = [
        ("pgbench-like heap pages", pgbench_pages(size)),
        ("zeros", vec![0u8; size]),
        ("random", random(size, 1)),
    ];
    for (name, raw) in &sets {
        let (stored, frame) = compress_once(raw, true);
        println!(
            "\n{name}: {} MB -> {} MB (ratio {:.2})",
            raw.len() / 1_000_000,
            stored / 1_000_000,
            raw.len() as f64 / stored as f64
        );
        for n in [1, threads] {
            let t = parallel(n, |_| compress_once(raw, true));
            report(
                &format!("compress+crc32c+sha256, {n} thread(s)"),
                n * raw.len(),
                t,
            );
        }
        for n in [1, threads] {
            let t = parallel(n, |_| decompress_crc(&frame));
            report(
                &format!("decompress+crc32c,      {n} thread(s)"),
                n * raw.len(),
                t,
            );
        }
    }

    // The backup path end to end: 2 workers, each storing 300 MB as 1 GiB-segment-like files
    // of 50 MB, through LocalStorage (page cache write + fdatasync + rename + dir fsync).
    let local = LocalStorage::new(work.path().join("repo"));
    let pages = pgbench_pages(50_000_000);
    let t = parallel(threads, |worker| {
        for i in 0..6 {
            let key = format!("backup/B/data/base/5/{worker}-{i}.lz4");
            let stored = store_compressed(&local, &key, &mut Cursor::new(&pages), Commit::Replace);
            stored.map(drop).unwrap_or_else(|e| panic!("{e}"));
        }
    });
    report(
        &format!("backup store_compressed to disk, {threads} thread(s)"),
        threads * 6 * pages.len(),
        t,
    );
    let keys = local.list("backup/B")?;
    assert_eq!(keys.len(), threads * 6);
    let t = parallel(threads, |worker| {
        let mine = keys.iter().filter(|k| k.contains(&format!("/{worker}-")));
        for key in mine {
            let digest = fetch_decompressed(&local, key, &mut std::io::sink(), None, false);
            digest.map(drop).unwrap_or_else(|e| panic!("{e}"));
        }
    });
    report(
        &format!("validate fetch_decompressed from disk, {threads} thread(s)"),
        threads * 6 * pages.len(),
        t,
    );
    let memory = MemoryStorage::default();
    store_compressed(&memory, "m", &mut Cursor::new(&pages), Commit::Replace)?;
    let t =
        timed(|| fetch_decompressed(&memory, "m", &mut std::io::sink(), None, false).map(drop))?;
    report(
        "validate fetch_decompressed from memory, 1 thread",
        pages.len(),
        t,
    );

    // archive-push: one 16 MiB segment per call, Commit::New, as archive_command does it; the
    // same work in one thread and into memory shows what the SHA-256 helper thread and the
    // fsyncs each account for.
    for (name, segment) in [
        ("WAL-like segment", wal_like(16 << 20)),
        ("zero segment", vec![0u8; 16 << 20]),
    ] {
        let label = name.replace(' ', "_");
        let memory = MemoryStorage::default();
        let rows = [
            (
                "store_compressed to disk, incl. fsync",
                median_ms(|i| {
                    let key = format!("archive/1/0000000100000000/{label}-{i:08X}.lz4");
                    let mut src = Cursor::new(&segment);
                    store_compressed(&local, &key, &mut src, Commit::New).map(drop)
                })?,
            ),
            (
                "store_compressed into memory",
                median_ms(|i| {
                    let key = format!("archive/1/0000000100000000/{label}-{i:08X}.lz4");
                    let mut src = Cursor::new(&segment);
                    store_compressed(&memory, &key, &mut src, Commit::New).map(drop)
                })?,
            ),
            (
                "compress+crc+sha on one thread",
                median_ms(|_| {
                    compress_once(&segment, true);
                    Ok::<_, std::io::Error>(())
                })?,
            ),
            (
                "  of which compress+crc",
                median_ms(|_| {
                    compress_once(&segment, false);
                    Ok::<_, std::io::Error>(())
                })?,
            ),
            (
                "  of which sha256",
                median_ms(|_| {
                    use sha2::Digest as _;
                    std::hint::black_box(sha2::Sha256::digest(&segment));
                    Ok::<_, std::io::Error>(())
                })?,
            ),
        ];
        println!("archive-push {name} (16 MiB), median of 20 runs, wall / CPU ms:");
        for (what, (wall, cpu)) in rows {
            println!("  {what:<40} {wall:5.1} / {cpu:5.1}");
        }
    }
    Ok(())
}

fn compress_once(raw: &[u8], sha256: bool) -> (u64, Vec<u8>) {
    let mut w = CompressWriter::new(Vec::with_capacity(raw.len() / 2), sha256);
    for chunk in raw.chunks(1 << 20) {
        std::io::Write::write_all(&mut w, chunk).unwrap_or_else(|e| panic!("{e}"));
    }
    let (_, stored, frame) = w.finish().unwrap_or_else(|e| panic!("{e}"));
    (stored, frame)
}

fn decompress_crc(frame: &[u8]) -> u32 {
    let mut r = DecompressReader::new(frame, false);
    loop {
        let n = r.fill_buf().unwrap_or_else(|e| panic!("{e}")).len();
        if n == 0 {
            return r.digest().crc32c;
        }
        r.consume(n);
    }
}

/// Wall-clock and process CPU time of one measured run.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

/// Runs `f(0)..f(n - 1)` on `n` threads at once.
fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Took {
    let (start, cpu) = (Instant::now(), process_cpu());
    std::thread::scope(|s| {
        for i in 0..n {
            let f = &f;
            s.spawn(move || f(i));
        }
    });
    Took {
        wall: start.elapsed(),
        cpu: process_cpu().saturating_sub(cpu),
    }
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we hand it.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed<E>(f: impl FnOnce() -> Result<(), E>) -> Result<Took, E> {
    let (start, cpu) = (Instant::now(), process_cpu());
    f()?;
    Ok(Took {
        wall: start.elapsed(),
        cpu: process_cpu().saturating_sub(cpu),
    })
}

/// Median wall and CPU milliseconds of 20 runs.
fn median_ms<E>(mut f: impl FnMut(usize) -> Result<(), E>) -> Result<(f64, f64), E> {
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for i in 0..20 {
        let t = timed(|| f(i))?;
        walls.push(t.wall);
        cpus.push(t.cpu);
    }
    walls.sort();
    cpus.sort();
    Ok((ms(walls[10]), ms(cpus[10])))
}

fn report(what: &str, bytes: usize, t: Took) {
    let mb = bytes as f64 / MB;
    println!(
        "  {what}: {:.0} MB/s wall, {:.0} MB per CPU-second",
        mb / t.wall.as_secs_f64(),
        mb / t.cpu.as_secs_f64()
    );
}

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

/// Heap pages shaped like `pgbench_accounts` after some TPC-B-like traffic: page header, 61
/// line pointers, tuples of 23-byte header + aid, bid, abalance + char(84) filler of spaces,
/// with varying xmin and some non-zero balances.
fn pgbench_pages(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut aid: u32 = 1;
    let mut block: u32 = 0;
    while out.len() < len {
        let mut page = [0u8; 8192];
        let tuples = 61;
        let tuple_len = 121;
        let lsn = 0x0000_0001_0000_0000u64 + u64::from(block) * 977;
        page[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        page[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        let lower = 24 + 4 * tuples;
        let upper = 8192 - 128 * tuples;
        page[12..14].copy_from_slice(&(lower as u16).to_le_bytes());
        page[14..16].copy_from_slice(&(upper as u16).to_le_bytes());
        page[16..18].copy_from_slice(&8192u16.to_le_bytes());
        page[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
        for t in 0..tuples {
            let off = 8192 - 128 * (t + 1);
            let lp = (off as u32) | (1 << 15) | ((tuple_len as u32) << 17);
            page[24 + 4 * t..28 + 4 * t].copy_from_slice(&lp.to_le_bytes());
            let tup = &mut page[off..off + 128];
            let xmin = 750 + (rng.next() % 4 == 0) as u32 * (rng.next() as u32 % 100_000);
            tup[0..4].copy_from_slice(&xmin.to_le_bytes());
            tup[12..16].copy_from_slice(&block.to_le_bytes()[..4]);
            tup[16..18].copy_from_slice(&((t + 1) as u16).to_le_bytes());
            tup[18..20].copy_from_slice(&4u16.to_le_bytes());
            tup[20..22].copy_from_slice(&0x0902u16.to_le_bytes());
            tup[22] = 24;
            tup[24..28].copy_from_slice(&aid.to_le_bytes());
            tup[28..32].copy_from_slice(&(aid / 100_000 + 1).to_le_bytes());
            let balance = if rng.next() % 5 == 0 {
                (rng.next() % 10_000) as i32 - 5_000
            } else {
                0
            };
            tup[32..36].copy_from_slice(&balance.to_le_bytes());
            tup[36] = 0xAB;
            tup[37..121].fill(b' ');
            aid += 1;
        }
        out.extend_from_slice(&page);
        block += 1;
    }
    out.truncate(len);
    out
}

/// A rough WAL segment under pgbench: records with 24-byte headers, a third of them carrying a
/// full-page image of a heap page, the rest short update records.
fn wal_like(len: usize) -> Vec<u8> {
    let fpi = pgbench_pages(8192 * 64);
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let header: [u8; 24] = std::array::from_fn(|i| {
            if i < 12 {
                rng.next() as u8
            } else {
                (i * 3) as u8
            }
        });
        out.extend_from_slice(&header);
        if rng.next() % 3 == 0 {
            let page = (rng.next() % 64) as usize * 8192;
            out.extend_from_slice(&fpi[page..page + 8192]);
        } else {
            let body: [u8; 56] =
                std::array::from_fn(|i| if i % 4 == 0 { rng.next() as u8 } else { 0 });
            out.extend_from_slice(&body);
        }
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
