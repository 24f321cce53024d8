//! A webhook receiver on 127.0.0.1 that takes, refuses (500), never
//! answers or redirects on command, recording every request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the receiver answers.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Answer {
    Take,
    Refuse,
    Hang,
    Redirect,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub answered: Answer,
}

impl Received {
    /// The body, parsed.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver on 127.0.0.1, one thread per connection.
pub struct Receiver {
    address: String,
    answer: Arc<Mutex<Answer>>,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Listen on a free port, answering `answer`.
    pub fn start(answer: Answer) -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").expect("bind"), answer)
    }

    /// Serve on `listener`, answering `answer`.
    pub fn on(listener: TcpListener, answer: Answer) -> Self {
        let address = listener.local_addr().expect("address").to_string();
        let answer = Arc::new(Mutex::new(answer));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (a, g) = (Arc::clone(&answer), Arc::clone(&got));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (a, g) = (Arc::clone(&a), Arc::clone(&g));
                std::thread::spawn(move || serve(stream, &a, &g));
            }
        });
        Receiver {
            address,
            answer,
            got,
        }
    }

    /// The URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// Answer `answer` from now on.
    pub fn set(&self, answer: Answer) {
        *self.answer.lock().expect("answer") = answer;
    }

    /// Every request so far.
    pub fn got(&self) -> Vec<Received> {
        self.got.lock().expect("got").clone()
    }

    /// The requests answered with a success.
    pub fn taken(&self) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| r.answered == Answer::Take)
            .collect()
    }
}

fn serve(stream: TcpStream, answer: &Mutex<Answer>, got: &Mutex<Vec<Received>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let answered = *answer.lock().expect("answer");
    got.lock().expect("got").push(Received {
        headers,
        body,
        answered,
    });
    let mut stream = stream;
    match answered {
        Answer::Take => {
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
        }
        Answer::Refuse => {
            let _ = stream.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\noops",
            );
        }
        Answer::Hang => std::thread::sleep(Duration::from_secs(30)),
        Answer::Redirect => {
            let _ = stream.write_all(
                b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    }
}

impl Receiver {
    /// The JSON bodies of the first `n` events taken, waiting up to `deadline`.
    pub fn wait_for_events(&self, n: usize, deadline: Duration) -> Vec<serde_json::Value> {
        super::wait_for(&format!("{n} webhook events"), deadline, || {
            let taken = self.taken();
            (taken.len() >= n).then(|| taken.iter().map(Received::json).collect())
        })
    }
}
