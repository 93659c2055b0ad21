//! SPDY/3 header blocks: the name/value encoding and its zlib compression.
//!
//! A block is a 32-bit count, then per header a 32-bit name length, the lowercase
//! name, a 32-bit value length and the value, several values of one name joined by
//! NUL (SPDY/3 §2.6.10). Blocks are compressed with one zlib stream per direction for
//! the whole session, primed with the SPDY/3 dictionary (§2.6.10.1) and cut with a
//! sync flush after each block — so every block must be decoded, in order, even for
//! frames the session ignores.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::HeaderError;

/// The most decompressed bytes one header block may take.
pub const MAX_BLOCK_LEN: usize = 256 << 10;
/// The most name/value pairs one header block may hold.
pub const MAX_HEADERS: usize = 256;

/// Header names and values; names are kept lowercase and looked up without case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a value for `name` (lowercased), after any it already has.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.entries
            .push((name.to_ascii_lowercase(), value.to_owned()));
    }

    /// Builder form of [`Headers::insert`].
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.insert(name, value);
        self
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every (name, value) pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many (name, value) pairs there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The uncompressed SPDY/3 block: one entry per distinct name, values NUL-joined.
    fn to_block(&self) -> Vec<u8> {
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in &self.entries {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for name in names {
            let value = self.get_all(name).collect::<Vec<_>>().join("\0");
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Parses an uncompressed block, within [`MAX_HEADERS`].
    fn from_block(block: &[u8]) -> Result<Self, HeaderError> {
        let mut rest = block;
        let count = take_u32(&mut rest)? as usize;
        if count > MAX_HEADERS {
            return Err(HeaderError::TooMany { cap: MAX_HEADERS });
        }
        let mut headers = Headers::new();
        for _ in 0..count {
            let name = take_str(&mut rest)?;
            if name.is_empty() {
                return Err(HeaderError::Malformed("an empty header name"));
            }
            let value = take_str(&mut rest)?;
            for v in value.split('\0') {
                if headers.entries.len() == MAX_HEADERS {
                    return Err(HeaderError::TooMany { cap: MAX_HEADERS });
                }
                headers.insert(name, v);
            }
        }
        if !rest.is_empty() {
            return Err(HeaderError::Malformed("bytes after the last header"));
        }
        Ok(headers)
    }
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, HeaderError> {
    let Some((word, tail)) = rest.split_first_chunk::<4>() else {
        return Err(HeaderError::Malformed("a truncated length"));
    };
    *rest = tail;
    Ok(u32::from_be_bytes(*word))
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Result<&'a str, HeaderError> {
    let len = take_u32(rest)? as usize;
    if len > rest.len() {
        return Err(HeaderError::Malformed("a length past the block's end"));
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    std::str::from_utf8(s).map_err(|_| HeaderError::Malformed("a name or value not UTF-8"))
}

/// One direction's compressor: every block this side sends, in order.
pub struct HeaderEncoder {
    z: Compress,
}

impl std::fmt::Debug for HeaderEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderEncoder").finish_non_exhaustive()
    }
}

impl HeaderEncoder {
    /// A fresh context primed with the SPDY/3 dictionary.
    pub fn new() -> Result<Self, HeaderError> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(DICTIONARY)
            .map_err(HeaderError::Compress)?;
        Ok(Self { z })
    }

    /// Compresses `headers` as the next block of this session.
    pub fn encode(&mut self, headers: &Headers) -> Result<Bytes, HeaderError> {
        let input = headers.to_block();
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let start = self.z.total_in();
        loop {
            let done = (self.z.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            self.z
                .compress_vec(&input[done..], &mut out, FlushCompress::Sync)
                .map_err(HeaderError::Compress)?;
            // Complete once all input is taken and the flush had room to spare.
            if (self.z.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                return Ok(Bytes::from(out));
            }
        }
    }
}

/// One direction's decompressor: every block the peer sends, in order.
pub struct HeaderDecoder {
    z: Decompress,
}

impl std::fmt::Debug for HeaderDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecoder").finish_non_exhaustive()
    }
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    /// A fresh context; the dictionary is supplied when the stream asks for it.
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// Decompresses and parses the peer's next block. More than [`MAX_BLOCK_LEN`]
    /// decompressed bytes is an error (a bomb costs at most that much memory); after
    /// any error the context is out of step and the session must end.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let raw = self.inflate(block)?;
        Headers::from_block(&raw)
    }

    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut out: Vec<u8> = Vec::with_capacity(block.len().saturating_mul(4).min(MAX_BLOCK_LEN));
        let start = self.z.total_in();
        loop {
            let used = (self.z.total_in() - start) as usize;
            if out.len() == out.capacity() {
                if out.len() >= MAX_BLOCK_LEN {
                    return Err(HeaderError::TooLarge { cap: MAX_BLOCK_LEN });
                }
                let grow = out.len().max(1024).min(MAX_BLOCK_LEN - out.len());
                out.reserve_exact(grow);
            }
            let before_out = out.len();
            match self
                .z
                .decompress_vec(&block[used..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(HeaderError::Malformed("the zlib stream ended"));
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(DICTIONARY)
                        .map_err(HeaderError::Decompress)?;
                    continue;
                }
                Err(e) => return Err(HeaderError::Decompress(e)),
            }
            let used_now = (self.z.total_in() - start) as usize;
            let progressed = used_now != used || out.len() != before_out;
            if used_now == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if !progressed && out.len() < out.capacity() {
                return Err(HeaderError::Malformed("a truncated compressed block"));
            }
        }
    }
}

pub(crate) const DICTIONARY: &[u8] = b"\
\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03pu\
t\x00\x00\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0e\
accept-charset\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\
\x00\x0daccept-ranges\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauth\
orization\x00\x00\x00\x0dcache-control\x00\x00\x00\x0aconnection\x00\x00\x00\x0cc\
ontent-base\x00\x00\x00\x10content-encoding\x00\x00\x00\x10content-language\x00\x00\
\x00\x0econtent-length\x00\x00\x00\x10content-location\x00\x00\x00\x0bcontent-md5\
\x00\x00\x00\x0dcontent-range\x00\x00\x00\x0ccontent-type\x00\x00\x00\x04date\x00\
\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\x00\x00\x00\x04from\
\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-since\x00\
\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-si\
nce\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwa\
rds\x00\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-\
authorization\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-af\
ter\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\x11\
transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04\
vary\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\
\x00\x00\x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200 OK\
\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06\
public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin1\
001012012022052063003023033043053063074024054064074084094104114124134144154164175\
02504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 B\
ad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 \
Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct No\
v Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,\
image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascr\
ipt,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,\
enq=0.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        // 0xe3c6a7c2 is the SPDY/3 dictionary's Adler-32, the id zlib streams name.
        let mut z = Compress::new(Compression::default(), true);
        assert_eq!(z.set_dictionary(DICTIONARY).expect("dict"), 0xe3c6_a7c2);
        assert_eq!(DICTIONARY.len(), 1423);
    }

    #[test]
    fn blocks_share_one_context_per_direction() {
        let mut enc = HeaderEncoder::new().expect("encoder");
        let mut dec = HeaderDecoder::new();
        let mut sizes = Vec::new();
        for i in 0..5 {
            let h = Headers::new()
                .with("streamType", "stdout")
                .with("X-Multi", "a")
                .with("x-multi", &format!("b{i}"))
                .with("empty", "");
            let block = enc.encode(&h).expect("encode");
            sizes.push(block.len());
            let got = dec.decode(&block).expect("decode");
            assert_eq!(got.get("streamtype"), Some("stdout"));
            assert_eq!(
                got.get_all("x-multi").collect::<Vec<_>>(),
                ["a", &format!("b{i}")]
            );
            assert_eq!(got.get("empty"), Some(""));
            assert_eq!(got.len(), 4);
        }
        // Later blocks reuse the earlier ones' history: they are smaller.
        assert!(sizes[4] < sizes[0], "{sizes:?}");
        // A fresh decoder cannot read a later block alone.
        let block = enc.encode(&Headers::new().with("a", "b")).expect("encode");
        assert!(HeaderDecoder::new().decode(&block).is_err());
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        // 4 MiB of zeros compresses to a few KiB; it must stop at the cap.
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(DICTIONARY).expect("dict");
        let input = vec![0u8; 4 << 20];
        let mut out = Vec::with_capacity(64 << 10);
        z.compress_vec(&input, &mut out, FlushCompress::Sync)
            .expect("compress");
        assert!(out.len() < MAX_BLOCK_LEN);
        let err = HeaderDecoder::new().decode(&out).expect_err("bomb");
        assert!(matches!(err, HeaderError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn hostile_counts_are_refused() {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(DICTIONARY).expect("dict");
        let mut out = Vec::with_capacity(1024);
        // Claims 4 billion headers and a 4 GiB name.
        let raw = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        z.compress_vec(&raw, &mut out, FlushCompress::Sync)
            .expect("compress");
        assert!(matches!(
            HeaderDecoder::new().decode(&out),
            Err(HeaderError::TooMany { .. })
        ));
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(DICTIONARY).expect("dict");
        let mut out = Vec::with_capacity(1024);
        z.compress_vec(
            &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff],
            &mut out,
            FlushCompress::Sync,
        )
        .expect("compress");
        assert!(matches!(
            HeaderDecoder::new().decode(&out),
            Err(HeaderError::Malformed(_))
        ));
        assert!(HeaderDecoder::new().decode(b"garbage!").is_err());
    }
}
