package org.trialtwin.hapi;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.SpringBootConfiguration;
import org.springframework.boot.autoconfigure.ImportAutoConfiguration;
import org.springframework.boot.autoconfigure.context.PropertyPlaceholderAutoConfiguration;
import org.springframework.boot.autoconfigure.web.embedded.EmbeddedWebServerFactoryCustomizerAutoConfiguration;
import org.springframework.boot.autoconfigure.web.servlet.ServletWebServerFactoryAutoConfiguration;
import org.springframework.context.annotation.Import;

/**
 * Entry point of TrialTwin's HAPI FHIR R4 JPA test server.
 *
 * <p>Only the embedded servlet container is auto-configured; everything FHIR-related is wired
 * explicitly in {@link FhirJpaConfig} so that no Spring Boot auto-configuration (data sources,
 * JPA, Elasticsearch, Thymeleaf ...) competes with the beans HAPI's JPA configuration expects.
 */
@SpringBootConfiguration
@ImportAutoConfiguration({
	PropertyPlaceholderAutoConfiguration.class,
	ServletWebServerFactoryAutoConfiguration.class,
	EmbeddedWebServerFactoryCustomizerAutoConfiguration.class
})
@Import(FhirJpaConfig.class)
public class HapiServerApplication {

	public static void main(String[] args) {
		SpringApplication.run(HapiServerApplication.class, args);
	}
}
