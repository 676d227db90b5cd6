//! `kiln serve`'s config file: the TOML as `Config::load` parses it, then
//! `Config::check`.
//!
//! Properties: a config that parses and passes the check renders to TOML
//! that parses back to the same config, which passes again; a config the
//! check refuses is refused with a message that starts with the key at
//! fault (`section.key`).
#![no_main]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use kiln_executor::edges::Config;
use libfuzzer_sys::fuzz_target;

/// The config's sections, as the default config renders them.
fn sections() -> &'static BTreeSet<String> {
    static SECTIONS: OnceLock<BTreeSet<String>> = OnceLock::new();
    SECTIONS.get_or_init(|| {
        let rendered = toml::to_string(&Config::default()).expect("the default renders");
        let table: toml::Table = toml::from_str(&rendered).expect("and parses");
        table.keys().cloned().collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<Config>(text) else {
        return;
    };
    match config.check() {
        Ok(()) => {
            let rendered = toml::to_string(&config).expect("a checked config renders");
            let back: Config = toml::from_str(&rendered).unwrap_or_else(|e| {
                panic!("a checked config renders to TOML it refuses ({e}):\n{rendered}")
            });
            assert_eq!(back, config, "the TOML round trip changed the config");
            back.check()
                .expect("a rendered config passes its check again");
        }
        Err(e) => {
            let message = e.to_string();
            let key = message.split_whitespace().next().unwrap_or_default();
            let (section, name) = key.split_once('.').unwrap_or_default();
            assert!(
                sections().contains(section) && !name.is_empty(),
                "refused without naming the key first: {message}"
            );
        }
    }
});
