package org.trialtwin.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.IDaoRegistry;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.ValueSetOperationProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.api.SearchTotalModeEnum;
import ca.uhn.fhir.rest.api.PreferHandlingEnum;
import ca.uhn.fhir.parser.StrictErrorHandler;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.SearchPreferHandlingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Lazy;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.util.Properties;
import javax.sql.DataSource;

/**
 * The beans HAPI FHIR's R4 JPA configuration leaves to the application: database, entity
 * manager, storage settings, the validation chain we expose, and the RestfulServer at /fhir.
 *
 * <p>Request validation is deliberately absent: TrialTwin uses this server as a store and as a
 * profile validator through {@code $validate}, never as a gatekeeper on writes.
 */
@Configuration
@EnableTransactionManagement
// Batch2 (reindexing after SearchParameter changes, deferred terminology storage) needs a message
// broker; SubscriptionChannelConfig provides HAPI's in-memory one, so no external broker is involved.
@Import({
	JpaR4Config.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class,
	ThreadPoolFactoryConfig.class
})
public class FhirJpaConfig {

	@Value("${trialtwin.hapi.jdbc-url:jdbc:h2:mem:hapi}")
	private String jdbcUrl;

	@Value("${trialtwin.hapi.default-page-size:50}")
	private int defaultPageSize;

	// Same ceiling as the embedded store (fhir_ops.search.query.MAX_COUNT).
	@Value("${trialtwin.hapi.max-page-size:1000}")
	private int maxPageSize;

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource() {
		BasicDataSource ds = new BasicDataSource();
		ds.setDriverClassName("org.h2.Driver");
		ds.setUrl(jdbcUrl);
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(20);
		return ds;
	}

	@Bean
	public JpaStorageSettings jpaStorageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// Client-chosen ids of any shape (as the embedded store accepts) and UUIDs for server ids,
		// so ids look alike whichever store TrialTwin runs on.
		settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
		settings.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
		// A store must answer what was just written: no reuse of cached search results, and an
		// exact Bundle.total like the embedded store gives.
		settings.setReuseCachedSearchResultsForMillis(null);
		settings.setDefaultTotalMode(SearchTotalModeEnum.ACCURATE);
		settings.setAllowExternalReferences(true);
		settings.setExpungeEnabled(true);
		settings.setDeleteExpungeEnabled(true);
		settings.setFetchSizeDefaultMaximum(maxPageSize);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			DataSource dataSource,
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource);
		Properties props = new Properties();
		props.put("hibernate.dialect", "ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect");
		props.put("hibernate.hbm2ddl.auto", "update");
		// Hibernate Search (Lucene/Elasticsearch) is not needed for a test store and costs start-up time.
		props.put("hibernate.search.enabled", "false");
		props.put("hibernate.jdbc.batch_size", "20");
		props.put("hibernate.cache.use_query_cache", "false");
		props.put("hibernate.cache.use_second_level_cache", "false");
		props.put("hibernate.cache.use_structured_entries", "false");
		props.put("hibernate.cache.use_minimal_puts", "false");
		props.put("hibernate.format_sql", "false");
		props.put("hibernate.show_sql", "false");
		emf.setJpaProperties(props);
		return emf;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Bean
	public IFulltextSearchSvc fullTextSearchSvc() {
		return new FulltextSearchSvcImpl();
	}

	@Bean
	public IHSearchSortHelper hSearchSortHelper(ISearchParamRegistry searchParamRegistry) {
		return new HSearchSortHelperImpl(searchParamRegistry);
	}

	@Bean
	public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
		return new StaleSearchDeletingSvcImpl();
	}

	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
		DatabaseBackedPagingProvider paging = new DatabaseBackedPagingProvider();
		paging.setDefaultPageSize(defaultPageSize);
		paging.setMaximumPageSize(maxPageSize);
		return paging;
	}

	@Bean
	public IResourceSupportedSvc resourceSupportedSvc(IDaoRegistry daoRegistry) {
		return new DaoRegistryResourceSupportedSvc(daoRegistry);
	}

	@Bean(name = "myResourceCountsCache")
	public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> systemDao) {
		return ResourceCountCacheUtil.newResourceCountCache(systemDao);
	}

	@Lazy
	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			ValueSetOperationProvider valueSetOperations,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider) {
		// validationSupport resolves to HAPI's primary JpaValidationSupportChain: built-in R4
		// definitions, StructureDefinitions stored here (so uploaded profiles drive $validate),
		// snapshot generation for differential-only profiles, and terminology.

		// Reject unknown elements and malformed values instead of silently dropping them (HAPI's
		// default), as the embedded store does: a store that loses data quietly is worse than a 400.
		systemDao.getContext().setParserErrorHandler(new StrictErrorHandler());
		// Keep "Type/id/_history/n" in stored references (HAPI's parser strips the version by
		// default): Provenance pins the exact versions a twin output was computed from, and the
		// embedded store returns references as written.
		systemDao.getContext().getParserOptions().setStripVersionsFromReferences(false);
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(valueSetOperations);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("TrialTwin HAPI FHIR R4 test server");
		server.setServerConformanceProvider(capabilities);
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(ca.uhn.fhir.rest.api.EncodingEnum.JSON);
		// Honour "Prefer: handling=lenient" (unknown search parameters dropped, and absent from the
		// Bundle's self link, which is how clients learn what was ignored); strict stays the default.
		SearchPreferHandlingInterceptor preferHandling = new SearchPreferHandlingInterceptor(searchParamRegistry);
		preferHandling.setDefaultBehaviour(PreferHandlingEnum.STRICT);
		server.registerInterceptor(preferHandling);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer restfulServer) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(restfulServer, "/fhir/*");
		registration.setName("fhir");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
