//! DNS answers for the guest, built by the host proxy.
//!
//! The guest reaches nothing but the proxy, so every name it may use
//! resolves to the proxy's address ([`super::SERVICE_ADDR`]). The proxy
//! then learns the real destination from the TLS server name or HTTP Host
//! header and applies the policy to that name. Names that the policy denies
//! by name, or that do not exist, get NXDOMAIN, so programs fail at once.
//!
//! Only the parts of RFC 1035 needed for that are handled: one question per
//! query, answers of type A, and empty answers for every other type.

use std::net::Ipv4Addr;

/// Time to live of answers, in seconds: short, because the addresses
/// behind a name are looked up again by the proxy on every connection.
const TTL_SECS: u32 = 5;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_FORMAT_ERROR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOT_IMPLEMENTED: u8 = 4;

/// The question of a standard query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// Bytes of the header and question, copied into the response.
    end: usize,
}

impl Question {
    pub fn is_address_query(&self) -> bool {
        self.qtype == TYPE_A && self.qclass == CLASS_IN
    }
}

/// Parses a query; `Err` carries the response code for a query that cannot
/// be answered (a response is still sent when the header is readable).
pub(crate) fn parse_query(message: &[u8]) -> Result<Question, u8> {
    if message.len() < 12 {
        return Err(RCODE_FORMAT_ERROR);
    }
    let flags = u16::from_be_bytes([message[2], message[3]]);
    let opcode = (flags >> 11) & 0xf;
    let questions = u16::from_be_bytes([message[4], message[5]]);
    if flags & 0x8000 != 0 || opcode != 0 {
        return Err(RCODE_NOT_IMPLEMENTED);
    }
    if questions != 1 {
        return Err(RCODE_FORMAT_ERROR);
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at).ok_or(RCODE_FORMAT_ERROR)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers never occur in the question of a query.
        if len > 63 {
            return Err(RCODE_FORMAT_ERROR);
        }
        let label = message.get(at..at + len).ok_or(RCODE_FORMAT_ERROR)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let fixed = message.get(at..at + 4).ok_or(RCODE_FORMAT_ERROR)?;
    Ok(Question {
        name: labels.join("."),
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
        end: at + 4,
    })
}

/// Builds the response to `query`: `address` as the answer to an A query,
/// no answer for other types, or the error `rcode`.
pub(crate) fn response(query: &[u8], question: Option<&Question>, answer: Answer) -> Vec<u8> {
    let mut out = query[..query.len().min(12)].to_vec();
    out.resize(12, 0);
    if let Some(question) = question {
        out.extend_from_slice(&query[12..question.end]);
    }
    let request_flags = u16::from_be_bytes([out[2], out[3]]);
    // QR, the request's opcode and RD, RA; AA stays clear.
    let mut flags = 0x8000 | (request_flags & 0x7900) | 0x0080;
    let rcode = match answer {
        Answer::Error(rcode) => rcode,
        Answer::NxDomain => RCODE_NXDOMAIN,
        _ => 0,
    };
    flags |= u16::from(rcode);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    let questions: u16 = question.is_some().into();
    out[4..6].copy_from_slice(&questions.to_be_bytes());
    let answers: u16 = matches!(answer, Answer::Address(_)).into();
    out[6..8].copy_from_slice(&answers.to_be_bytes());
    out[8..12].fill(0);

    if let Answer::Address(address) = answer {
        out.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&address.octets());
    }
    out
}

/// What to put in a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    Address(Ipv4Addr),
    /// The name exists but has no record of the type asked for.
    NoData,
    NxDomain,
    Error(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut message = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            message.push(label.len() as u8);
            message.extend_from_slice(label.as_bytes());
        }
        message.push(0);
        message.extend_from_slice(&qtype.to_be_bytes());
        message.extend_from_slice(&CLASS_IN.to_be_bytes());
        message
    }

    #[test]
    fn a_query_gets_the_address() {
        let message = query("PyPI.org", TYPE_A);
        let question = parse_query(&message).unwrap();
        assert_eq!(question.name, "pypi.org");
        assert!(question.is_address_query());
        let address = Ipv4Addr::new(10, 0, 2, 100);
        let out = response(&message, Some(&question), Answer::Address(address));
        assert_eq!(&out[..2], &[0x12, 0x34]);
        assert_eq!(out[3] & 0x0f, 0, "response code");
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 1, "answer count");
        assert_eq!(&out[out.len() - 4..], &address.octets());
    }

    #[test]
    fn nxdomain_has_no_answer() {
        let message = query("blocked.example", 28);
        let question = parse_query(&message).unwrap();
        assert!(!question.is_address_query());
        let out = response(&message, Some(&question), Answer::NxDomain);
        assert_eq!(out[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 0);
        assert_eq!(out.len(), message.len());
    }

    #[test]
    fn malformed_queries_get_errors() {
        assert_eq!(parse_query(&[0; 5]), Err(RCODE_FORMAT_ERROR));
        let mut truncated = query("a.example", TYPE_A);
        truncated.truncate(truncated.len() - 3);
        assert_eq!(parse_query(&truncated), Err(RCODE_FORMAT_ERROR));
        let out = response(&truncated, None, Answer::Error(RCODE_FORMAT_ERROR));
        assert_eq!(out.len(), 12);
        assert_eq!(out[3] & 0x0f, RCODE_FORMAT_ERROR);
    }
}
