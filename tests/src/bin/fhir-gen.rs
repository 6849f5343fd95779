//! `fhir-gen bundle BYTES FILE` / `fhir-gen ndjson BYTES FILE`: synthetic FHIR test
//! data (see phigate_e2e::fhir), for the masking benchmark and by hand.

use std::io::Write;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fhir-gen bundle|ndjson BYTES FILE";
    let (kind, bytes, file) = match args.as_slice() {
        [_, k, b, f] => (k.as_str(), b.parse::<usize>().expect(usage), f),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    match kind {
        "bundle" => out.write_all(&phigate_e2e::fhir::bundle_of_size(1, bytes))?,
        "ndjson" => phigate_e2e::fhir::ndjson_of_size(1, bytes, &mut out)?,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
    out.flush()
}
