//! Certificates generated at test time (rcgen): a CA, server certificates with IP and DNS
//! names, client certificates named by a DNS SAN or only a common name, and expired ones. Every
//! file is written as PEM into a directory the test owns; no key is ever committed.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The certificate's DER bytes, for comparing with what a server presents.
    pub der: Vec<u8>,
}

/// A certificate authority whose files live in `dir`.
pub struct Pki {
    dir: PathBuf,
    name: String,
    cert: Certificate,
    key: KeyPair,
}

/// What a leaf certificate is for.
enum Leaf<'a> {
    Server(&'a [&'a str]),
    Client { san: Option<&'a str>, cn: &'a str },
}

impl Pki {
    /// A new CA called `name`; writes `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).expect("create PKI directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write CA");
        Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cert,
            key,
        }
    }

    /// The CA certificate file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    fn issue(&self, stem: &str, leaf: Leaf<'_>, expired: bool) -> CertFiles {
        let (mut params, purpose, cn) = match leaf {
            Leaf::Server(names) => (
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .expect("server params"),
                ExtendedKeyUsagePurpose::ServerAuth,
                names.first().copied().unwrap_or("server").to_string(),
            ),
            Leaf::Client { san, cn } => (
                CertificateParams::new(san.map(|s| vec![s.to_string()]).unwrap_or_default())
                    .expect("client params"),
                ExtendedKeyUsagePurpose::ClientAuth,
                cn.to_string(),
            ),
        };
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A server certificate for `names` (IP addresses or DNS names); the first is also the CN.
    pub fn server(&self, stem: &str, names: &[&str]) -> CertFiles {
        self.issue(stem, Leaf::Server(names), false)
    }

    /// A client certificate whose identity is the DNS SAN `identity`, with a different CN (so a
    /// test can tell the SAN was used).
    pub fn client(&self, stem: &str, identity: &str) -> CertFiles {
        self.issue(
            stem,
            Leaf::Client {
                san: Some(identity),
                cn: "not-the-identity",
            },
            false,
        )
    }

    /// A client certificate without SANs whose identity is its common name.
    pub fn client_cn_only(&self, stem: &str, cn: &str) -> CertFiles {
        self.issue(stem, Leaf::Client { san: None, cn }, false)
    }

    /// A client certificate that expired on 2021-01-01.
    pub fn expired_client(&self, stem: &str, identity: &str) -> CertFiles {
        self.issue(
            stem,
            Leaf::Client {
                san: Some(identity),
                cn: identity,
            },
            true,
        )
    }
}
