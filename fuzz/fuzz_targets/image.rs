//! Image headers and decoding: any bytes give an image or an error, never a panic; a
//! decoded image has the size its header says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = iris_fuzz::limits();
    let header = iris_image::dimensions(data, limits);
    if let Ok(img) = iris_image::decode(data, limits) {
        assert_eq!(img.data.len(), img.width * img.height * 3);
        let (w, h) = header.expect("a decodable image has a readable header");
        assert_eq!((w as usize, h as usize), (img.width, img.height));
    }
});
